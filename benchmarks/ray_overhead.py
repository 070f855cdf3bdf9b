"""Ray's cost on an on-policy step: the same ``reverse_kl`` step in one process vs through roles.

Both cases run raykd's own ``reverse_kl`` stage code (``raykd.algorithms.onpolicy.run``) with
the same config as ``benchmarks/onpolicy_step.py`` (LM term off), except that the roles are
laid out the same way in both: one rollout worker, one teacher scorer and one learner, each
with all the threads (2). Sampling, scoring and updating take turns either way.

* ``local``: every role is a plain object in this process (``benchmarks/_local_roles.py``);
  fan-out calls are direct method calls and weight sync is an in-process copy into the
  sampler's model.
* ``actors``: the roles are Ray actors (the normal path): calls, arguments and results go
  through Ray, weights through the object store.

Reported: s/step and its phases for both, the difference (what the roles cost the step), and
the actors' own ``time/ray_overhead`` (driver wait minus time inside the actors).

Usage::

    python benchmarks/ray_overhead.py            # full (~5 min on 2 cores)
    python benchmarks/ray_overhead.py --quick    # tiny models

Results: ``benchmarks/results/ray_overhead[_quick].json`` (``--out``) and a table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import bench_models, print_report, result_path, run_case, table, write_result  # noqa: E402
from onpolicy_step import COLUMNS, flat, forwarded, parser, raykd_case, settings, summarise  # noqa: E402

CASES = ("local", "actors")


def main() -> None:
    args = parser(__doc__, CASES).parse_args()
    if args.worker:
        out = raykd_case(args, 0.0, layout="single", local=args.worker == "local")
        Path(args.result).write_text(json.dumps(out, default=float))
        return
    bench_models(args.quick)
    rows, raw = [], {}
    for case in args.cases:
        print(f"[ray_overhead] {case} ...", flush=True)
        raw[case] = run_case(__file__, case, forwarded(args))
        rows.append(summarise(case, raw[case]))
    by = {r["case"]: r for r in rows}
    summary = {}
    if {"local", "actors"} <= set(by):
        local, actors = by["local"]["s_per_step"]["mean"], by["actors"]["s_per_step"]["mean"]
        summary = {
            "step_seconds_local": local,
            "step_seconds_actors": actors,
            "roles_cost_seconds": actors - local,
            "roles_cost_fraction": (actors - local) / actors,
            "ray_overhead_fraction": by["actors"]["phases"]["ray_overhead"] / actors,
        }
    out = write_result(result_path(args, "ray_overhead"), {
        "benchmark": "ray_overhead", "quick": args.quick, "settings": settings(args),
        "cases": by, "summary": summary, "raw": raw,
    })  # fmt: skip
    print_report(table([flat(r) for r in rows], COLUMNS), summary, out, "{:.3f}")


if __name__ == "__main__":
    main()
