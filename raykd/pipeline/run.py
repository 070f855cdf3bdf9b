"""The pipeline: one config-driven job from teacher to evaluated, reported student.

Steps, each skipped when its result is already in the run directory (so a killed run resumes
where it stopped; a training stage resumes from its last checkpoint)::

    prepare   resolve the teacher, tokenise the task
    stages    ``pipeline.stages`` with ``trains: teacher`` (teacher SFT): the tuned teacher
              then teaches, is cut into the student and is the reference of the report
    student   derive the student (layer subset of the teacher, or pretrained/config)
    eval      teacher and the untrained student on the eval split
    stages    the student stages of ``pipeline.stages`` in order (sft, word_kd, grpo, ...)
    eval      the final student
    quantize  (``quantize.enabled``) GPTQ + baselines of the final student as Ray tasks,
              each evaluated and measured (:mod:`raykd.pipeline.quantize_stage`)
    report    report.md / report.json / report.png

:func:`run_pipeline` returns the results (metrics, model paths) and sends every logged step
to a reporter callback (the console by default; a Tune trial passes its own).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from raykd.algorithms import get_algorithm
from raykd.algorithms.common import Reporter, StageContext, console_reporter
from raykd.atomic import atomic_write_json, recover_dir
from raykd.config import save_config, split_seed
from raykd.config.stages import stage_params
from raykd.data import load_task
from raykd.evaluate.generation import (
    evaluate_model,
    evaluate_stub,
    humaneval_cfg,
    humaneval_summary,
)
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
from raykd.pipeline.preflight import check_run
from raykd.pipeline.provenance import Provenance, digest, file_fingerprint
from raykd.pipeline.quantize_stage import (
    check_quantize_settings,
    quantization_rows,
    run_quantize,
    student_shape_source,
)
from raykd.quantize import checkpoint_stats
from raykd.roles.factory import SlotPlacement, sampler_group
from raykd.roles.runtime import init_ray
from raykd.roles.target_cache import model_fingerprint
from raykd.rundir import RunDir


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
        # init=width keeps every layer unless keep/layers ask for a layer cut first
        all_layers = sc.init == "width" and sc.keep is None and not sc.layers
        rule = "width" if all_layers else sc.rule
        distances = None
        if sc.rule == "angular" and not all_layers:
            distances = angular_distances(teacher, tokenizer, calibration, n - sc.keep)
        layers = list(range(n)) if all_layers else select_layers(
            n,
            sc.rule,
            keep=sc.keep,
            layers=list(sc.layers) if sc.layers else None,
            distances=distances,
        )  # fmt: skip
        model = derive_student(teacher, layers, rule=rule, teacher_name=cfg.teacher.model)
        info = {
            "init": sc.init,
            "rule": rule,
            "layers": layers,
            "teacher_layers": n,
            "teacher_params": count_parameters(teacher),
            "block_distances": distances,
        }
        del teacher
        if sc.init == "width":
            from raykd.models.width import width_student

            model, info["width"] = width_student(
                model, tokenizer, calibration, sc.target_non_embedding_params,
                axes=list(sc.width_axes), fixed=dict(sc.width_sizes),
                multiple=sc.width_multiple, aggregate=sc.width_importance,
            )  # fmt: skip
    save_model(model, tokenizer, out_dir)
    info["params"] = count_parameters(model)
    return info


def _eval_key(cfg, **parts) -> str:
    """Fingerprint of an eval result: the eval and data settings, the data file, ``parts``."""
    return digest({
        "eval": OmegaConf.to_container(cfg.eval, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "data_file": file_fingerprint(cfg.data.path),
        **parts,
    })  # fmt: skip


def _evaluate(cfg, rundir: RunDir, prov: Provenance, label: str, model_path: str, task,
              placement=None, humaneval=None) -> dict:  # fmt: skip
    record = rundir.path("eval", f"{label}.json")
    key = _eval_key(cfg, model=model_fingerprint(model_path),
                    rollout={k: cfg.rollout[k] for k in ("backend", "dtype")})  # fmt: skip
    cached = prov.reuse(record, key, [], chain=False)
    if cached is not None:
        return cached
    with sampler_group(cfg, model_path, placement=placement) as rollouts:
        result = evaluate_model(rollouts, task.eval, task.kind, cfg.eval, label)
        if humaneval is not None:  # eval.humaneval: the same model on HumanEval too
            result["humaneval"] = humaneval_summary(
                evaluate_model(
                    rollouts, humaneval, "code", humaneval_cfg(cfg.eval), f"{label} humaneval"
                )  # fmt: skip
            )
    result["model_path"] = model_path
    result["size_mb"] = model_size_mb(model_path)
    result["params"] = checkpoint_stats(model_path)["params"]  # packed weights unpacked
    result["config_hash"] = key
    atomic_write_json(record, result)
    return result


def _evaluate_stub(cfg, rundir: RunDir, prov: Provenance, task, humaneval=None) -> dict:
    """The signature stub (:mod:`raykd.evaluate.baselines`) scored like a model."""
    record = rundir.path("eval", "stub.json")
    key = _eval_key(cfg, model="stub")  # no model, no sampler settings
    cached = prov.reuse(record, key, [], chain=False)
    if cached is not None:
        return cached
    result = evaluate_stub(task.eval, task.kind, cfg.eval)
    if humaneval is not None:
        result["humaneval"] = humaneval_summary(
            evaluate_stub(humaneval, "code", humaneval_cfg(cfg.eval), "stub humaneval")
        )
    result["config_hash"] = key
    atomic_write_json(record, result)
    return result


def stage_hash(cfg, stage: dict, params, model_in: str, teacher_path: str) -> str:
    """Fingerprint of what a stage's result depends on: its parameters, the sections every
    stage reads, its input model and teacher (weights), the data settings and file."""
    sections = {k: OmegaConf.to_container(cfg[k], resolve=True)
                for k in ("learner", "rollout", "teacher", "data", "student")}  # fmt: skip
    return digest({
        "stage": stage,
        "params": OmegaConf.to_container(params, resolve=True),
        "sections": sections,
        "seed": cfg.run.seed,
        "checkpoint_every": cfg.pipeline.checkpoint_every,
        "data_file": file_fingerprint(cfg.data.path),
        "model_in": model_fingerprint(model_in),
        "teacher": model_fingerprint(teacher_path),
    })  # fmt: skip


def _run_stage(
    cfg, rundir: RunDir, prov: Provenance, stage: dict, model_in: str, teacher_path: str, task,
    tokenizer, reporter: Reporter, placement: SlotPlacement | None,
) -> tuple[dict, str]:  # fmt: skip
    """Run (or skip, when done; or resume, when checkpointed) one stage that trains
    ``model_in`` with the stage's algorithm into ``models/<name>``; return its summary and
    output dir."""
    name = stage["name"]
    out = rundir.model_dir(name)
    recover_dir(out)
    params = stage_params(cfg, stage)
    config_hash = stage_hash(cfg, stage, params, model_in, teacher_path)
    outputs = [
        out,
        rundir.checkpoint_dir(name),
        rundir.path("data", f"{name}-teacher_samples.jsonl"),
        rundir.path("data", f"{name}-completions.jsonl"),  # GRPO's sampled completions
    ]
    summary = prov.reuse(rundir.path("stages", f"{name}.json"), config_hash, outputs)
    if summary is None:
        print(f"[raykd] stage {name} ({stage['algorithm']}) starting from {model_in}", flush=True)
        ctx = StageContext(
            cfg=cfg,
            params=params,
            rundir=rundir,
            stage=name,
            student_in=model_in,
            student_out=str(out),
            teacher_path=teacher_path,
            train=task.train,
            pad_id=tokenizer.pad_token_id,
            tokenizer_path=teacher_path,
            placement=placement,
            reporter=reporter,
            heldout=task.eval,
        )
        summary = {**get_algorithm(stage["algorithm"])(ctx), "config_hash": config_hash}
        rundir.mark_done(name, summary)
    return summary, str(out)


def run_pipeline(
    cfg, reporter: Reporter | None = None, placement: SlotPlacement | None = None
) -> dict:
    """Run (or resume) every stage of ``cfg``; return the results.

    ``reporter(stage, step, total, metrics)`` receives every logged step (default: print);
    ``placement`` puts every role into bundles reserved for the whole run (a Tune trial).
    Results: ``run_dir``, ``task``, ``models`` (eval results by label), ``stages`` (summaries
    by name), ``final_model``, ``report``, ``compression``, ``wall_seconds``.
    """
    reporter = reporter or console_reporter
    t_start = time.time()
    rundir = run_dir_for(cfg)
    prov = Provenance(rundir.root, cfg)
    prov.check_directory()  # refuses another config's results before anything is written
    save_config(cfg, rundir.path("config.yaml"))
    print(f"[raykd] run directory: {rundir.root}", flush=True)

    # prepare (no Ray node yet: what the files can tell is checked first)
    teacher_path = resolve_model(cfg.teacher.model)
    check_run(cfg, teacher_path)  # header-only checks (vocabularies) before any model loads
    check_quantize_settings(cfg, student_shape_source(cfg, teacher_path))
    tokenizer = load_tokenizer(teacher_path)
    dc = cfg.data
    data_seed = split_seed(cfg)  # data.split_seed, else run.seed
    task = load_task(
        dc.task,
        tokenizer,
        path=dc.path,
        max_length=dc.max_length,
        num_train=dc.num_train,
        num_eval=dc.num_eval,
        eval_fraction=dc.eval_fraction,
        seed=data_seed,
        system_prompt=dc.system_prompt,
    )
    if dc.eval_task:  # held out on another task (e.g. train on function_tasks, eval HumanEval)
        held = load_task(dc.eval_task, tokenizer, path=dc.eval_path, max_length=dc.max_length,
                         num_train=0, num_eval=dc.num_eval, eval_fraction=dc.eval_fraction,
                         seed=data_seed, system_prompt=dc.system_prompt)  # fmt: skip
        task.eval, task.kind = held.eval, held.kind
        task.stats.update(eval=len(held.eval), eval_task=held.stats)
    humaneval = None  # eval.humaneval: every model of a code task also on HumanEval
    if cfg.eval.humaneval and task.kind == "code":
        humaneval = load_task("humaneval", tokenizer, max_length=max(dc.max_length, 2048),
                              num_train=0, num_eval=cfg.eval.humaneval_problems,
                              seed=data_seed,
                              system_prompt=dc.system_prompt).eval  # fmt: skip

    atomic_write_json(rundir.path("stages", "data.json"), task.stats)
    print(
        f"[raykd] task {dc.task}: {len(task.train)} train / {len(task.eval)} eval examples "
        f"({task.stats.get('dropped', 0)} dropped as longer than {dc.max_length} tokens)",
        flush=True,
    )
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.num_gpus, cfg.ray.allocator)
    stages = OmegaConf.to_container(cfg.pipeline.stages, resolve=True)
    teacher_stages = [s for s in stages if s.get("trains") == "teacher"]
    student_stages = [s for s in stages if s.get("trains", "student") == "student"]

    def run_stage(stage, model_in, teacher):
        return _run_stage(
            cfg, rundir, prov, stage, model_in, teacher, task, tokenizer, reporter, placement
        )

    # teacher stages (fine-tuning): from here on the tuned teacher is "the teacher"
    results: dict = {"task": dc.task, "kind": task.kind, "models": {}, "stages": {}}
    base_teacher = teacher_path
    for stage in teacher_stages:
        results["stages"][stage["name"]], teacher_path = run_stage(
            stage, teacher_path, base_teacher
        )

    # student
    student_dir = rundir.model_dir("student_init")
    recover_dir(student_dir)
    student_key = digest({
        "student": OmegaConf.to_container(cfg.student, resolve=True),
        "teacher": model_fingerprint(teacher_path),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "data_file": file_fingerprint(cfg.data.path),
        "seed": cfg.run.seed,
    })  # fmt: skip
    student_info = prov.reuse(rundir.path("stages", "student.json"), student_key, [student_dir])
    if student_info is None:
        calib = [
            ex.prompt_text + ex.reference for ex in task.train[: cfg.student.calibration_prompts]
        ]
        student_info = {**build_student(cfg, teacher_path, calib, student_dir),
                        "config_hash": student_key}  # fmt: skip
        rundir.mark_done("student", student_info)
    print(f"[raykd] student: {student_info.get('layers', student_info['init'])}", flush=True)
    check_quantize_settings(cfg, str(student_dir))  # its real sizes, before any training

    def evaluate(label, path):
        return _evaluate(cfg, rundir, prov, label, path, task, placement, humaneval)

    if cfg.eval.stub_baseline and task.kind == "code":  # the no-model floor, in every table
        results["models"]["stub"] = _evaluate_stub(cfg, rundir, prov, task, humaneval)

    if cfg.pipeline.eval_teacher:
        if teacher_path != base_teacher:
            results["models"]["teacher_base"] = evaluate("teacher_base", base_teacher)
        results["models"]["teacher"] = evaluate("teacher", teacher_path)
    if cfg.pipeline.eval_student_before:
        results["models"]["student_before"] = evaluate("student_before", str(student_dir))

    # student stages
    current = str(student_dir)
    for stage in student_stages:
        results["stages"][stage["name"]], current = run_stage(stage, current, teacher_path)

    final = None
    if student_stages:
        results["models"]["student_after"] = evaluate("student_after", current)
        final = rundir.model_dir("final")
        if prov.redone and final.exists():
            shutil.rmtree(final)  # a copy of a stage that was redone
        if not final.exists():
            save_model(load_model(current), tokenizer, final)
    if cfg.quantize.enabled:
        quant_in, label = (
            (str(final), "student_after") if final else (str(student_dir), "student_before")
        )
        quant = run_quantize(cfg, rundir, prov, quant_in, task, evaluate, placement, label)
        results["models"].update(quant.pop("models"))
        rows = quantization_rows(quant, results["models"], label)
        del quant["measured"]  # in eval/measure-*.json; the rows carry what the report shows
        results["quantization"] = {**quant, "rows": rows}
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
    results.update(run_dir=str(rundir.root), final_model=str(final) if final else None,
                   report=str(report))  # fmt: skip
    return results
