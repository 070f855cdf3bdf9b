"""The pipeline: one config-driven job from teacher to evaluated, reported student.

Stages, each skipped when its result is already in the run directory (so a killed run
resumes where it stopped; a training stage resumes from its last checkpoint)::

    prepare   resolve the teacher, tokenise the task
    teacher   optional: fine-tune the teacher (SFT, ``teacher_sft``); it then teaches
    student   derive the student (layer subset of the teacher, or pretrained/config)
    eval      teacher and the untrained student on the eval split
    train     each algorithm in ``pipeline.train`` in order (sft, word_kd, reverse_kl, ...)
    eval      the final student
    report    report.md / report.json / report.png
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from raykd.algorithms import get_algorithm
from raykd.algorithms.common import StageContext, make_rollouts
from raykd.config import save_config
from raykd.data import load_task
from raykd.evaluate.generation import evaluate_model
from raykd.evaluate.report import write_report
from raykd.models import (
    angular_distances,
    count_parameters,
    derive_student,
    load_model,
    load_tokenizer,
    model_size_mb,
    resolve_model,
    save_model,
    select_layers,
)
from raykd.pipeline.rundir import RunDir, atomic_write_json, recover_dir
from raykd.roles.runtime import init_ray


def stored_parameters(model_dir: str) -> int:
    """Parameters stored in a model directory's safetensors files (tied weights once)."""
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                total += _numel(fh, key)
    return total


def _numel(fh, key: str) -> int:
    n = 1
    for d in fh.get_slice(key).get_shape():
        n *= d
    return n


def run_dir_for(cfg) -> RunDir:
    return RunDir(Path(cfg.run.output_dir) / cfg.run.name)


def build_student(cfg, teacher_path: str, calibration: list[str], out_dir: Path) -> dict:
    """Create the initial student at ``out_dir``; return how it was built."""
    sc = cfg.student
    tokenizer = load_tokenizer(teacher_path)
    if sc.init == "pretrained":
        model = load_model(resolve_model(sc.model))
        info = {"init": "pretrained", "model": sc.model}
    elif sc.init == "config":
        from raykd.models import from_config

        torch.manual_seed(cfg.run.seed)
        model = from_config(OmegaConf.to_container(sc.model_config, resolve=True))
        info = {"init": "config"}
    else:
        teacher = load_model(teacher_path)
        n = teacher.config.num_hidden_layers
        distances = None
        if sc.rule == "angular":
            distances = angular_distances(teacher, tokenizer, calibration, n - sc.keep)
        layers = select_layers(
            n,
            sc.rule,
            keep=sc.keep,
            layers=list(sc.layers) if sc.layers else None,
            distances=distances,
        )
        model = derive_student(teacher, layers, rule=sc.rule, teacher_name=cfg.teacher.model)
        info = {
            "init": "from_teacher",
            "rule": sc.rule,
            "layers": layers,
            "teacher_layers": n,
            "teacher_params": count_parameters(teacher),
            "block_distances": distances,
        }
        del teacher
    save_model(model, tokenizer, out_dir)
    info["params"] = count_parameters(model)
    return info


def _evaluate(cfg, rundir: RunDir, label: str, model_path: str, task) -> dict:
    cached = rundir.path("eval", f"{label}.json")
    if cached.exists():
        return json.loads(cached.read_text())
    rollouts = make_rollouts(cfg, model_path)
    try:
        result = evaluate_model(rollouts, task.eval, task.kind, cfg.eval, label)
    finally:
        rollouts.shutdown()
    result["model_path"] = model_path
    result["size_mb"] = model_size_mb(model_path)
    result["params"] = stored_parameters(model_path)
    atomic_write_json(cached, result)
    return result


def _train_stage(
    cfg, rundir: RunDir, stage: str, algo: str, model_in: str, teacher_path: str, task, tokenizer
) -> tuple[dict, str]:
    """Run (or skip, when done; or resume, when checkpointed) one training stage that trains
    ``model_in`` with ``algo`` into ``models/<stage>``; return its summary and output dir."""
    out = rundir.model_dir(stage)
    recover_dir(out)
    summary = rundir.stage_done(stage)
    if summary is None or not out.exists():
        print(f"[raykd] stage {stage} starting from {model_in}", flush=True)
        ctx = StageContext(
            cfg=cfg,
            rundir=rundir,
            stage=stage,
            student_in=model_in,
            student_out=str(out),
            teacher_path=teacher_path,
            train=task.train,
            pad_id=tokenizer.pad_token_id,
            tokenizer_path=teacher_path,
        )
        summary = get_algorithm(algo)(ctx)
        rundir.mark_done(stage, summary)
    return summary, str(out)


def run_pipeline(cfg) -> Path:
    """Run (or resume) every stage of ``cfg``; return the run directory."""
    t_start = time.time()
    rundir = run_dir_for(cfg)
    save_config(cfg, rundir.path("config.yaml"))
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.num_gpus)
    print(f"[raykd] run directory: {rundir.root}", flush=True)

    # prepare
    teacher_path = resolve_model(cfg.teacher.model)
    tokenizer = load_tokenizer(teacher_path)
    dc = cfg.data
    task = load_task(
        dc.task,
        tokenizer,
        path=dc.path,
        max_length=dc.max_length,
        num_train=dc.num_train,
        num_eval=dc.num_eval,
        eval_fraction=dc.eval_fraction,
        seed=cfg.run.seed,
        system_prompt=dc.system_prompt,
    )
    atomic_write_json(rundir.path("stages", "data.json"), task.stats)
    print(
        f"[raykd] task {dc.task}: {len(task.train)} train / {len(task.eval)} eval examples "
        f"({task.stats.get('dropped', 0)} dropped as longer than {dc.max_length} tokens)",
        flush=True,
    )

    # teacher fine-tuning (optional): from here on the fine-tuned teacher is "the teacher"
    results = {"task": dc.task, "kind": task.kind, "models": {}, "stages": {}}
    base_teacher = teacher_path
    if cfg.pipeline.finetune_teacher:
        teacher_cfg = OmegaConf.merge(cfg, {"sft": OmegaConf.to_container(cfg.teacher_sft)})
        stage = "teacher-sft"
        results["stages"][stage], teacher_path = _train_stage(
            teacher_cfg, rundir, stage, "sft", teacher_path, base_teacher, task, tokenizer
        )

    # student
    student_dir = rundir.model_dir("student_init")
    recover_dir(student_dir)
    student_info = rundir.stage_done("student")
    if student_info is None or not student_dir.exists():
        calib = [
            ex.prompt_text + ex.reference for ex in task.train[: cfg.student.calibration_prompts]
        ]
        student_info = build_student(cfg, teacher_path, calib, student_dir)
        rundir.mark_done("student", student_info)
    print(f"[raykd] student: {student_info.get('layers', student_info['init'])}", flush=True)

    if cfg.pipeline.eval_teacher:
        if teacher_path != base_teacher:
            results["models"]["teacher_base"] = _evaluate(
                cfg, rundir, "teacher_base", base_teacher, task
            )
        results["models"]["teacher"] = _evaluate(cfg, rundir, "teacher", teacher_path, task)
    if cfg.pipeline.eval_student_before:
        results["models"]["student_before"] = _evaluate(
            cfg, rundir, "student_before", str(student_dir), task
        )

    # train
    current = str(student_dir)
    for i, algo in enumerate(cfg.pipeline.train):
        stage = f"{i + 1}-{algo}"
        results["stages"][stage], current = _train_stage(
            cfg, rundir, stage, algo, current, teacher_path, task, tokenizer
        )

    if cfg.pipeline.train:
        results["models"]["student_after"] = _evaluate(cfg, rundir, "student_after", current, task)
        final = rundir.model_dir("final")
        if not final.exists():
            save_model(load_model(current), tokenizer, final)

    t_params = (student_info.get("teacher_params") or {}).get("total")
    s_params = (student_info.get("params") or {}).get("total")
    results["compression"] = {
        "teacher_params": t_params,
        "student_params": s_params,
        "params_kept_percent": round(100.0 * s_params / t_params, 1) if t_params else None,
        "teacher_non_embedding": (student_info.get("teacher_params") or {}).get("non_embedding"),
        "student_non_embedding": (student_info.get("params") or {}).get("non_embedding"),
        "layers": f"{len(student_info['layers'])}/{student_info['teacher_layers']}"
        if student_info.get("layers")
        else None,
    }
    results["wall_seconds"] = round(time.time() - t_start, 1)
    curves = {}
    for stage in results["stages"]:
        curves[stage] = [(r["step"], r["loss"]) for r in rundir.read_metrics(stage) if "loss" in r]
    report = write_report(rundir.root, results, curves)
    rundir.close()
    print(f"[raykd] done in {results['wall_seconds']:.0f}s. Report: {report}", flush=True)
    return rundir.root
