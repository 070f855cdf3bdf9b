"""The learner's train step in its Ray actor vs the same calls in one process.

The same :class:`raykd.roles.learner.Learner` (DeepSpeed ZeRO-0, one rank, 2 threads,
AdamW at lr 1e-5) on the benchmark student (the quickstart's 24-layer one; ``--quick``: a tiny
one) takes ``--calls`` train steps on one fixed batch (4 quickstart examples, cross-entropy:
the forward+backward+step cost of any of raykd's losses on that batch):

* ``in_process``: the learner is a plain object in a fresh process;
* ``actor``: the learner is an actor made by :func:`raykd.roles.factory.learner_group` (the
  stages' path), each call timed inside the actor, with the system allocator like the
  in-process case;
* ``actor_jemalloc``: the same with raykd's default ``ray.allocator`` (jemalloc keeping
  freed pages: no page faults of fresh memory every step).

Reported per case over the calls after the first: wall seconds per call, the CPU seconds the
learner's process used per call (all its threads), its torch thread count, and the losses
(which must agree: same data, same seed).

Usage::

    python benchmarks/learner_step.py            # full (~3 min on 2 cores)
    python benchmarks/learner_step.py --quick

Results: ``benchmarks/results/learner_step[_quick].json`` (``--out``) and a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
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

CASES = ("in_process", "actor", "actor_jemalloc")
#: getrusage fields reported per call (seconds, counts)
RUSAGE = ("utime", "stime", "minflt", "majflt", "nvcsw", "nivcsw")
SETUP = dict(zero_stage=0, lr=1e-5, weight_decay=0.0, betas=[0.9, 0.95], warmup_steps=0,
             micro_batch_size=4, grad_accum=1, grad_clip=1.0, seed=0)  # fmt: skip


def timed_step(learner, micro_batches) -> dict:
    """One train step, with its wall and process CPU seconds (runs where the learner is)."""
    import torch

    from raykd.algorithms.supervised import sft_loss

    r0, wall, cpu = (
        resource.getrusage(resource.RUSAGE_SELF),
        time.perf_counter(),
        time.process_time(),
    )
    metrics = learner.train_step(micro_batches, sft_loss)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    # where the CPU time went: user vs kernel (page faults of fresh allocations are kernel
    # time), and how often the process was switched out
    usage = {k: getattr(r1, f"ru_{k}") - getattr(r0, f"ru_{k}") for k in RUSAGE}
    return {"wall": wall, "cpu": cpu, "threads": torch.get_num_threads(),
            "loss": metrics["loss"], **usage}  # fmt: skip


def worker(args) -> dict:
    from raykd.algorithms.common import dataset_batch, to_micro_batches

    models = bench_models(args.quick)
    examples, pad_id = bench_examples(models["teacher"], 4, args.quick)
    shards = to_micro_batches(dataset_batch(examples, pad_id), 1, 1)
    calls = []
    if args.worker == "in_process":
        from raykd.roles.learner import Learner
        from raykd.roles.runtime import free_port

        learner = Learner(0, 1, args.threads)
        learner.setup("127.0.0.1", free_port(), models["student"], SETUP)
        calls = [timed_step(learner, shards[0]) for _ in range(args.calls)]
    else:
        import ray

        from raykd.config import load_config
        from raykd.roles.factory import learner_group
        from raykd.roles.runtime import init_ray

        # "actor": the system allocator, as the in-process case (the actor's own cost);
        # "actor_jemalloc": raykd's default ray.allocator
        init_ray(num_cpus=2, allocator="jemalloc" if args.worker == "actor_jemalloc" else "system")
        cfg = load_config(None, [f"learner.num_threads={args.threads}", "learner.zero_stage=0"])
        group = learner_group(cfg, models["student"], SETUP)
        actor = group.actors[0]
        try:
            for _ in range(args.calls):
                calls.append(ray.get(actor.__ray_call__.remote(timed_step, shards[0])))
        finally:
            group.shutdown()
    return {"calls": calls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calls", type=int, default=None, help="default 6 (--quick: 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.calls = args.calls or (2 if args.quick else 6)
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args), default=float))
        return
    bench_models(args.quick)
    extra = ["--calls", str(args.calls), "--threads", str(args.threads)]
    extra += ["--quick"] if args.quick else []
    cases, rows = {}, []
    for case in args.cases:
        print(f"[learner_step] {case} ...", flush=True)
        raw = run_case(__file__, case, extra)
        measured = raw["calls"][1:] or raw["calls"]  # the first call (warm-up) is dropped
        cases[case] = {
            "wall_per_call": spread([c["wall"] for c in measured]),
            "cpu_per_call": spread([c["cpu"] for c in measured]),
            "threads": sorted({c["threads"] for c in raw["calls"]}),
            "losses": [c["loss"] for c in raw["calls"]],
            "first_call_wall": raw["calls"][0]["wall"],
            **{f"{k}_per_call": spread([c[k] for c in measured]) for k in RUSAGE},
            "peak_memory_gib": raw["peak_memory_gib"],
        }
        c = cases[case]
        rows.append({"case": case, "wall": c["wall_per_call"]["mean"],
                     "cpu": c["cpu_per_call"]["mean"], "threads": str(c["threads"]),
                     "first": c["first_call_wall"], "sys": c["stime_per_call"]["mean"],
                     "faults": c["minflt_per_call"]["mean"]})  # fmt: skip
    summary = {}
    if {"actor", "in_process"} <= set(cases):
        a, p = cases["actor"], cases["in_process"]
        summary = {
            "actor_vs_in_process_wall": a["wall_per_call"]["mean"] / p["wall_per_call"]["mean"],
            "same_losses": all(
                abs(x - y) <= 1e-5 * max(1.0, abs(y)) for x, y in zip(a["losses"], p["losses"])
            ),  # fmt: skip
        }
    if {"actor", "actor_jemalloc"} <= set(cases):
        j, a = cases["actor_jemalloc"], cases["actor"]
        summary["jemalloc_vs_system_wall"] = j["wall_per_call"]["mean"] / a["wall_per_call"]["mean"]
    out = write_result(result_path(args, "learner_step"),
                       {"benchmark": "learner_step", "quick": args.quick, "calls": args.calls,
                        "cases": cases, "summary": summary})  # fmt: skip
    print_report(table(rows, [("case", "learner train step", ""), ("wall", "s/call", ".2f"),
                              ("cpu", "CPU s/call", ".2f"), ("threads", "threads", ""),
                              ("sys", "kernel s/call", ".2f"),
                              ("faults", "page faults/call", ".0f"),
                              ("first", "first call s", ".2f")]), summary, out)  # fmt: skip


if __name__ == "__main__":
    main()
