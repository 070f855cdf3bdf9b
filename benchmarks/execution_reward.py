"""Throughput of the execution reward: sandboxed programs per second.

Workload: ``--n`` completions of the generated function tasks (``raykd.data.function_tasks``),
alternating the reference (passes) and a wrong answer (fails; in ``fraction`` mode its tests
then run one by one). Cases:

* ``all_or_nothing`` in process with ``workers`` threads: one sandbox run per completion, so
  programs/s = completions/s;
* ``fraction`` in process: a passing answer costs one run, a failing one ``1 + N`` (its N
  tests one at a time); the runs are counted;
* ``ray_tasks``: ``all_or_nothing`` through :func:`raykd.roles.reward_tasks.score_completions`
  as ``--tasks`` Ray tasks of ``--cpus`` CPUs each (the GRPO path with ``grpo.reward_tasks``).

Usage::

    python benchmarks/execution_reward.py --n 96 --workers 1 2 4 --tasks 2

Results go to ``benchmarks/results/execution_reward.json`` (``--out``) and a table is printed.
The machine's load is recorded beside them (``os.getloadavg``): on shared cores it decides the
numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

from raykd.batch import Example
from raykd.data.function_tasks import generate_function_tasks
from raykd.rewards import get_reward
from raykd.sandbox import Sandbox, probe


def workload(n: int):
    records = generate_function_tasks()[:: max(1, 438 // n)][:n]
    examples = [Example(r.uid, [], [], meta=r.meta) for r in records]
    completions = [
        r.reference if i % 2 == 0 else f"def {r.meta['name']}(*args):\n    return None"
        for i, r in enumerate(records)
    ]
    return examples, completions


def count_runs() -> list[int]:
    """Patch :meth:`Sandbox.run_many` to count the runs it is given."""
    counter = [0]
    original = Sandbox.run_many

    def counting(self, items, *args, **kwargs):
        items = list(items)
        counter[0] += len(items)
        return original(self, items, *args, **kwargs)

    Sandbox.run_many = counting
    return counter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--cpus", type=float, default=0.5)
    ap.add_argument("--out", default="benchmarks/results/execution_reward.json")
    args = ap.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    examples, completions = workload(args.n)
    info = probe()
    counter = count_runs()
    rows = []

    def record(case, workers, seconds, runs, values):
        rows.append({"case": case, "workers": workers, "completions": len(completions),
                     "runs": runs, "seconds": round(seconds, 2),
                     "programs_per_s": round(runs / seconds, 1),
                     "completions_per_s": round(len(completions) / seconds, 1),
                     "mean_reward": round(sum(values) / len(values), 3),
                     "load": os.getloadavg()[0]})  # fmt: skip
        print(f"{case:16s} workers={workers!s:>5} runs={runs:4d} {seconds:6.1f}s "
              f"{runs / seconds:6.1f} programs/s  mean reward {rows[-1]['mean_reward']}",
              flush=True)  # fmt: skip

    for mode in ("all_or_nothing", "fraction"):
        for w in args.workers:
            fn = get_reward("execution", mode=mode, workers=w)
            counter[0] = 0
            t0 = time.perf_counter()
            values = fn(examples, completions)
            record(mode, w, time.perf_counter() - t0, counter[0], values)
    if args.tasks:
        import ray

        from raykd.roles.reward_tasks import score_completions
        from raykd.roles.runtime import init_ray

        init_ray(num_cpus=os.cpu_count())
        fn = get_reward("execution", mode="all_or_nothing", workers=max(1, int(args.cpus * 2)))
        score_completions(fn, examples[:4], completions[:4], num_tasks=args.tasks,
                          cpus_per_task=args.cpus)  # warm the workers  # fmt: skip
        t0 = time.perf_counter()
        values = score_completions(fn, examples, completions, num_tasks=args.tasks,
                                   cpus_per_task=args.cpus)  # fmt: skip
        record("ray_tasks", f"{args.tasks}x{args.cpus}", time.perf_counter() - t0, len(values),
               values)  # fmt: skip
        ray.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    layers = [n for n in ("namespaces", "seccomp", "landlock", "cgroup", "unprivileged_uid",
                          "audit") if info.get(n)]  # fmt: skip
    out.write_text(json.dumps({"rows": rows, "cpus": os.cpu_count(), "layers": layers,
                               "machine": platform.platform()}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
