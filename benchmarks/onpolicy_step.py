"""On-policy distillation step: raykd ``reverse_kl`` vs TRL's GKDTrainer (λ = 1, β = 1).

Both sides train the same 24-layer student (SmolLM2-135M-Instruct minus 6 layers, the
quickstart's) against the same SmolLM2-135M-Instruct teacher, on the same prompts in the same
order (raykd's example stream; TRL reads them sequentially), 4 prompts per step, 96 new tokens
sampled at temperature 1 (top-k 0, top-p 1, the same stop tokens), AdamW at lr 1e-5, float32,
no gradient checkpointing (TRL's default would turn it on, and the KV cache off in sampling),
on the same CPU threads. One step:

* **raykd** ``reverse_kl`` (MiniLLM policy gradient) through its roles, laid out as the
  quickstart does: 2 rollout workers (1 thread each) sample, the learner recomputes old
  log-probs, a teacher scorer (2 threads) scores the sampled tokens, the DeepSpeed learner
  (ZeRO-0, 2 threads) updates, and the weights sync to the rollout workers. Cases ``raykd``
  (``lm_coef`` 0) and ``raykd_lm`` (``lm_coef`` 1: a cross-entropy term on dataset responses,
  one more forward+backward per step, which TRL's GKD has no counterpart of), and
  ``raykd_bf16``: ``raykd`` with the samplers decoding in bfloat16 (``rollout.dtype``; the
  learner stays float32 and recomputes ``log q_old``; TRL samples with the model it trains).
* **TRL** ``GKDTrainer(lmbda=1, beta=1)`` in one process (2 threads): sample with the student,
  then the full-vocabulary reverse KL ``KL(q_S || p_T)`` on the samples (student and teacher
  forwards), backward and optimizer step.

Reported per case over the steps after the first: s/step, generated tokens/s over the step,
where the step's time goes (raykd: from its own ``time/*`` metrics, where ``scoring`` is the
wall time of teacher scoring and old log-probs side by side and ``teacher``/``old lp`` the
seconds each role worked in it; TRL: sampling and the teacher forward timed around its calls,
the rest is the update), and the peak memory of the case's whole process tree (Ray's
processes included).

Usage::

    python benchmarks/onpolicy_step.py            # full (~10 min on 2 cores)
    python benchmarks/onpolicy_step.py --quick    # tiny models, seconds per case
    python benchmarks/onpolicy_step.py --cases raykd trl_gkd --steps 4

Results go to ``benchmarks/results/onpolicy_step[_quick].json`` (``--out``) and a table is
printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import (  # noqa: E402
    bench_examples,
    bench_models,
    print_report,
    result_path,
    run_case,
    spread,
    table,
    write_result,
)

CASES = ("trl_gkd", "raykd", "raykd_lm", "raykd_bf16")
PHASES = ("sampling", "old_logprobs", "teacher_scoring", "scoring", "learner", "weight_sync",
          "ray_overhead", "controller")  # fmt: skip


def settings(args) -> dict:
    quick = args.quick
    return {
        "steps": args.steps or (3 if quick else 6),
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens or (16 if quick else 96),
        "threads": args.threads,
        "lr": 1e-5,
        "temperature": 1.0,
    }


def step_batches(train, prompts: int, steps: int, seed: int = 0):
    """The examples of each step, exactly as raykd's stage draws them."""
    from raykd.algorithms.common import example_stream

    stream = example_stream(train, prompts, seed)
    return [next(stream)[1] for _ in range(steps)]


# ---- raykd ---------------------------------------------------------------------------------
def raykd_overrides(s: dict, models: dict, lm_coef: float, layout: str) -> list[str]:
    """The config of raykd's side; ``layout``: ``quickstart`` (2 one-thread samplers) or
    ``single`` (one sampler with all the threads, as an in-process run has)."""
    t = s["threads"]
    samplers = ["rollout.num_workers=2", "rollout.num_threads=1"]
    if layout == "single":
        samplers = ["rollout.num_workers=1", f"rollout.num_threads={t}"]
    return [
        f"teacher.model={models['teacher']}", f"teacher.num_threads={t}",
        "learner.num_ranks=1", f"learner.num_threads={t}", "learner.zero_stage=0",
        f"learner.micro_batch_size={s['prompts']}", "learner.grad_accum=1",
        *samplers, f"rollout.max_new_tokens={s['max_new_tokens']}",
        f"rollout.temperature={s['temperature']}", "rollout.top_p=1.0",
        f"reverse_kl.steps={s['steps']}", f"reverse_kl.prompts_per_step={s['prompts']}",
        f"reverse_kl.lr={s['lr']}", f"reverse_kl.lm_coef={lm_coef}",
        "pipeline.checkpoint_every=0", "run.resume=false",
    ]  # fmt: skip


def run_raykd_stage(args, algorithm: str, overrides: list[str], train, pad_id: int,
                    local: bool = False) -> tuple[list[dict], float, dict]:  # fmt: skip
    """Run one raykd stage of ``algorithm`` (through its roles, or in this process with
    ``local``) from the benchmark student; its metrics rows, seconds and summary."""
    from raykd.algorithms import get_algorithm
    from raykd.algorithms.common import StageContext
    from raykd.config import load_config
    from raykd.config.stages import stage_params
    from raykd.rundir import RunDir

    models = bench_models(args.quick)
    cfg = load_config(None, overrides)
    if local:
        from _local_roles import patch_local_roles

        patch_local_roles()
    else:
        from raykd.roles.runtime import init_ray

        init_ray(num_cpus=2)
    with tempfile.TemporaryDirectory(prefix="raykd-bench-run-") as tmp:
        rundir = RunDir(tmp)
        stage = {"name": "stage", "algorithm": algorithm}
        ctx = StageContext(
            cfg=cfg, params=stage_params(cfg, stage), rundir=rundir, stage="stage",
            student_in=models["student"], student_out=str(Path(tmp) / "out"),
            teacher_path=models["teacher"], train=train, pad_id=pad_id,
            tokenizer_path=models["teacher"], reporter=lambda *a: None,
        )  # fmt: skip
        t0 = time.perf_counter()
        summary = get_algorithm(algorithm)(ctx)
        seconds = time.perf_counter() - t0
        rows = rundir.read_metrics("stage")
    return rows, seconds, summary


def raykd_case(args, lm_coef: float, layout: str = "quickstart", local: bool = False,
               extra: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """raykd's ``reverse_kl`` stage; its per-step timings and generated tokens; ``extra``:
    more config overrides."""
    s, models = settings(args), bench_models(args.quick)
    overrides = [*raykd_overrides(s, models, lm_coef, layout), *extra]
    train, pad_id = bench_examples(models["teacher"], s["prompts"] * s["steps"] * 2, args.quick)
    rows, seconds, _ = run_raykd_stage(args, "reverse_kl", overrides, train, pad_id, local)
    steps = []
    for r in rows:
        step = {k.removeprefix("time/"): v for k, v in r.items() if k.startswith("time/")}
        step["generated_tokens"] = r["response_tokens"] * s["prompts"]
        step["loss"] = r.get("loss")
        steps.append(step)
    return {"steps": steps, "stage_seconds": seconds, "settings": s, "config": overrides}


# ---- TRL -----------------------------------------------------------------------------------
def trl_case(args, lmbda: float = 1.0, beta: float = 1.0) -> dict:
    """TRL's GKDTrainer (default lmbda=1, beta=1) on the same prompts, one process."""
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from raykd.models import load_tokenizer
    from raykd.roles.rollout import _stop_ids

    s, models = settings(args), bench_models(args.quick)
    torch.set_num_threads(s["threads"])
    torch.manual_seed(0)
    tok = load_tokenizer(models["teacher"])
    train, pad_id = bench_examples(models["teacher"], s["prompts"] * s["steps"] * 2, args.quick)
    order = [ex for batch in step_batches(train, s["prompts"], s["steps"]) for ex in batch]
    data = Dataset.from_list([{"prompt_ids": ex.prompt_ids, "response_ids": ex.response_ids}
                              for ex in order])  # fmt: skip

    def collate(rows):
        width = max(len(r["prompt_ids"]) for r in rows)
        full = max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows)
        out = {k: torch.full((len(rows), n), v, dtype=torch.long) for k, n, v in
               [("prompts", width, pad_id), ("prompt_attention_mask", width, 0),
                ("input_ids", full, pad_id), ("attention_mask", full, 0),
                ("labels", full, -100)]}  # fmt: skip
        for i, r in enumerate(rows):
            p, y = r["prompt_ids"], r["response_ids"]
            out["prompts"][i, width - len(p) :] = torch.tensor(p)  # left-padded for generate
            out["prompt_attention_mask"][i, width - len(p) :] = 1
            out["input_ids"][i, : len(p) + len(y)] = torch.tensor(p + y)
            out["attention_mask"][i, : len(p) + len(y)] = 1
            out["labels"][i, len(p) : len(p) + len(y)] = torch.tensor(y)
        return out

    student = AutoModelForCausalLM.from_pretrained(models["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"], dtype=torch.float32)
    student.generation_config.eos_token_id = _stop_ids(tok)  # raykd's samplers stop on these
    phases: dict[str, float] = {}
    tokens: list[float] = []

    def timed(key, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            phases[key] = phases.get(key, 0.0) + time.perf_counter() - t0
            return out

        return wrapper

    generate = GKDTrainer.generate_on_policy_outputs

    def sample(model, inputs, generation_config):
        ids, mask, labels = generate(model, inputs, generation_config)
        tokens.append(float((labels != -100).sum()))
        return ids, mask, labels

    class Sequential(GKDTrainer):
        def _get_train_sampler(self, *a, **kw):
            return SequentialSampler(self.train_dataset)

    Sequential.generate_on_policy_outputs = staticmethod(timed("sampling", sample))
    steps: list[dict] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            phases.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            total = time.perf_counter() - self.t0
            step = {"step": total, **phases, "generated_tokens": tokens[-1] if tokens else 0}
            step["learner"] = total - sum(phases.values())
            steps.append(step)

    with tempfile.TemporaryDirectory(prefix="raykd-bench-trl-") as tmp:
        config = GKDConfig(
            output_dir=tmp, per_device_train_batch_size=s["prompts"],
            gradient_accumulation_steps=1, max_steps=s["steps"], learning_rate=s["lr"],
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            lmbda=lmbda, beta=beta, temperature=s["temperature"],
            max_new_tokens=s["max_new_tokens"], use_cpu=True, report_to=[],
            save_strategy="no", logging_steps=1, disable_dropout=True,
            dataloader_num_workers=0, seed=0, bf16=False, fp16=False,
            # TRL's default is True (recompute in backward, and sampling without a KV cache);
            # raykd's learner.gradient_checkpointing is False: compare like with like
            gradient_checkpointing=False,
        )  # fmt: skip
        trainer = Sequential(model=student, teacher_model=teacher, args=config,
                             train_dataset=data, processing_class=tok, data_collator=collate,
                             callbacks=[StepTimes()])  # fmt: skip
        trainer.teacher_model.forward = timed("teacher_scoring", trainer.teacher_model.forward)
        trainer.train()
    return {"steps": steps, "settings": s}


# ---- summary -------------------------------------------------------------------------------
def summarise(case: str, out: dict) -> dict:
    steps = out["steps"][1:] or out["steps"]  # the first step (warm-up) is dropped
    secs = [st["step"] for st in steps]
    row = {
        "case": case,
        "s_per_step": spread(secs),
        "first_step_seconds": out["steps"][0]["step"] if out["steps"] else None,
        "generated_tokens_per_s": sum(st["generated_tokens"] for st in steps) / sum(secs),
        "generated_tokens_per_step": sum(st["generated_tokens"] for st in steps) / len(steps),
        "phases": {
            p: sum(st[p] for st in steps) / len(steps)
            for p in PHASES
            if all(p in st for st in steps)
        },  # fmt: skip
        "peak_memory_gib": out.get("peak_memory_gib"),
        "measured_steps": len(steps),
    }
    return row


def flat(row: dict) -> dict:
    return {"case": row["case"], "s_step": row["s_per_step"]["mean"],
            "tok_s": row["generated_tokens_per_s"], "mem": row["peak_memory_gib"],
            **row["phases"]}  # fmt: skip


COLUMNS = [("case", "case", ""), ("s_step", "s/step", ".2f"), ("tok_s", "gen tok/s", ".1f"),
           ("sampling", "sampling", ".2f"), ("scoring", "scoring", ".2f"),
           ("old_logprobs", "old lp", ".2f"), ("teacher_scoring", "teacher", ".2f"),
           ("learner", "update", ".2f"),
           ("weight_sync", "sync", ".2f"), ("ray_overhead", "ray ovh", ".2f"),
           ("mem", "peak GiB", ".2f")]  # fmt: skip


def parser(doc: str, cases) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, few steps (tests)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=list(cases), choices=list(cases))
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return ap


def forwarded(args) -> list[str]:
    """The parent's settings, passed on to each case's process."""
    extra = ["--prompts", str(args.prompts), "--threads", str(args.threads)]
    if args.quick:
        extra.append("--quick")
    if args.steps:
        extra += ["--steps", str(args.steps)]
    if args.max_new_tokens:
        extra += ["--max-new-tokens", str(args.max_new_tokens)]
    return extra


def main() -> None:
    args = parser(__doc__, CASES).parse_args()
    if args.worker:
        run = {"trl_gkd": lambda: trl_case(args), "raykd": lambda: raykd_case(args, 0.0),
               "raykd_lm": lambda: raykd_case(args, 1.0),
               # the samplers decode in bfloat16 (the learners stay float32 and recompute
               # log q_old each step, as the sampler's own no longer match them)
               "raykd_bf16": lambda: raykd_case(args, 0.0, extra=("rollout.dtype=bfloat16",)),
               }[args.worker]  # fmt: skip
        Path(args.result).write_text(json.dumps(run(), default=float))
        return
    bench_models(args.quick)  # built once, before the cases
    rows, raw = [], {}
    for case in args.cases:
        print(f"[onpolicy_step] {case} ...", flush=True)
        raw[case] = run_case(__file__, case, forwarded(args))
        rows.append(summarise(case, raw[case]))
    by = {r["case"]: r for r in rows}
    ratios = {}
    if "trl_gkd" in by:
        for case in ("raykd", "raykd_lm", "raykd_bf16"):
            if case in by:
                ratios[f"{case}_throughput_vs_trl"] = (
                    by[case]["generated_tokens_per_s"] / by["trl_gkd"]["generated_tokens_per_s"]
                )
    out = write_result(result_path(args, "onpolicy_step"), {
        "benchmark": "onpolicy_step", "quick": args.quick, "settings": settings(args),
        "cases": by, "ratios": ratios, "raw": raw,
    })  # fmt: skip
    print_report(table([flat(r) for r in rows], COLUMNS), ratios, out, "{:.2f}x")


if __name__ == "__main__":
    main()
