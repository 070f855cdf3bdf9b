"""Off-policy word-level KD step: raykd ``word_kd`` (cached top-k targets) vs TRL GKD (λ = 0).

Same student, teacher and machine as ``benchmarks/onpolicy_step.py``; the quickstart's
dataset responses (docstring -> stdlib function, at most 256 tokens), 4 examples per step in
the same order on both sides, AdamW at lr 1e-5, float32, 2 threads.

* **raykd** ``word_kd`` (α = 0.2, τ = 1, forward KL on the teacher's top-32 plus a tail
  bucket, the quickstart's settings): the teacher scorer fills the top-k target cache once
  (timed apart: ``teacher_fill_seconds``; later epochs, reruns and sweep trials skip it), then
  the DeepSpeed learner (ZeRO-0) trains from the cached targets. No teacher forward per step.
* **TRL** ``GKDTrainer(lmbda=0, beta=0)``: forward KL on the full vocabulary on the dataset
  responses, with the live teacher's forward in every step.

Reported over the steps after the first: s/step, trained response tokens/s, and the peak
memory of the case's whole process tree (the teacher scorer's fill included for raykd).

Usage::

    python benchmarks/offpolicy_step.py            # full (~3 min on 2 cores)
    python benchmarks/offpolicy_step.py --quick    # tiny models

Results: ``benchmarks/results/offpolicy_step[_quick].json`` (``--out``) and a table.
"""

from __future__ import annotations

import json
import sys
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
from onpolicy_step import forwarded, parser, run_raykd_stage, settings, step_batches, trl_case  # noqa: E402

CASES = ("trl_gkd_lmbda0", "raykd_word_kd")


def examples(args):
    s, models = settings(args), bench_models(args.quick)
    # as many as onpolicy_step.trl_case loads, so both sides draw the same step batches
    train, pad_id = bench_examples(models["teacher"], s["prompts"] * s["steps"] * 2, args.quick)
    return s, models, train, pad_id


def raykd_word_kd(args, cache_dir: str) -> dict:
    s, models, train, pad_id = examples(args)
    t = s["threads"]
    overrides = [
        f"teacher.model={models['teacher']}", f"teacher.num_threads={t}", "teacher.top_k=32",
        f"teacher.cache_dir={cache_dir}", "teacher.batch_size=8",
        "learner.num_ranks=1", f"learner.num_threads={t}", "learner.zero_stage=0",
        f"learner.micro_batch_size={s['prompts']}", "learner.grad_accum=1",
        f"word_kd.steps={s['steps']}", "word_kd.alpha=0.2", "word_kd.temperature=1.0",
        f"word_kd.lr={s['lr']}", "pipeline.checkpoint_every=0", "run.resume=false",
    ]  # fmt: skip
    rows, seconds, summary = run_raykd_stage(args, "word_kd", overrides, train, pad_id)
    steps = [{k.removeprefix("time/"): v for k, v in r.items() if k.startswith("time/")}
             for r in rows if "time/step" in r]  # fmt: skip
    return {"steps": steps, "stage_seconds": seconds, "config": overrides,
            "teacher_fill_seconds": summary["teacher_targets"]["seconds"],
            "teacher_targets_scored": summary["teacher_targets"]["scored"]}  # fmt: skip


def summarise(case: str, out: dict, tokens_per_step: list[float]) -> dict:
    measured = list(zip(out["steps"], tokens_per_step))[1:]  # the first step is dropped
    secs = [st["step"] for st, _ in measured]
    return {
        "case": case,
        "s_per_step": spread(secs),
        "first_step_seconds": out["steps"][0]["step"],
        "trained_tokens_per_s": sum(n for _, n in measured) / sum(secs),
        "phases": {
            p: sum(st[p] for st, _ in measured) / len(measured)
            for p in ("teacher_scoring", "learner", "ray_overhead", "controller")
            if all(p in st for st, _ in measured)
        },  # fmt: skip
        "peak_memory_gib": out["peak_memory_gib"],
        "teacher_fill_seconds": out.get("teacher_fill_seconds"),
        "measured_steps": len(measured),
    }


def main() -> None:
    args = parser(__doc__, CASES).parse_args()
    if args.worker:
        import tempfile

        if args.worker == "raykd_word_kd":
            with tempfile.TemporaryDirectory(prefix="raykd-bench-targets-") as cache:
                out = raykd_word_kd(args, cache)
        else:
            out = trl_case(args, lmbda=0.0, beta=0.0)
        Path(args.result).write_text(json.dumps(out, default=float))
        return
    s, _, train, _ = examples(args)
    tokens = [float(sum(len(ex.response_ids) for ex in b))
              for b in step_batches(train, s["prompts"], s["steps"])]  # fmt: skip
    rows, raw = [], {}
    for case in args.cases:
        print(f"[offpolicy_step] {case} ...", flush=True)
        raw[case] = run_case(__file__, case, forwarded(args))
        rows.append(summarise(case, raw[case], tokens))
    by = {r["case"]: r for r in rows}
    ratios = {}
    if set(CASES) <= set(by):
        trl, rk = by["trl_gkd_lmbda0"], by["raykd_word_kd"]
        ratios = {
            "raykd_speedup_vs_trl": trl["s_per_step"]["mean"] / rk["s_per_step"]["mean"],
            "raykd_memory_vs_trl": rk["peak_memory_gib"] / trl["peak_memory_gib"],
        }
    out = write_result(result_path(args, "offpolicy_step"), {
        "benchmark": "offpolicy_step", "quick": args.quick, "settings": s,
        "cases": by, "ratios": ratios, "raw": raw,
    })  # fmt: skip
    flat = [{"case": r["case"], "s": r["s_per_step"]["mean"], "tok": r["trained_tokens_per_s"],
             "mem": r["peak_memory_gib"], "fill": r["teacher_fill_seconds"]} for r in rows]  # fmt: skip
    print_report(table(flat, [("case", "case", ""), ("s", "s/step", ".2f"),
                              ("tok", "trained tok/s", ".1f"), ("mem", "peak GiB", ".2f"),
                              ("fill", "target fill s", ".1f")]), ratios, out, "{:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
