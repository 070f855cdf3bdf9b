"""The sweep summary: every trial, the best one per group, a plot; Markdown + JSON.

:func:`trial_records` turns Tune's ``ResultGrid`` into plain records (one dict per trial);
:func:`build_summary` and :func:`write_summary` need only those records, so the summary is a
pure function of them (and tested without Ray).

A record: ``trial_id``, ``run_name``, ``run_dir``, ``group``, ``params`` (space values and
variant labels), ``status`` (``completed`` | ``stopped`` — by the scheduler, before the
pipeline finished | ``error`` | ``pending``), ``metric`` (the last value of the sweep metric),
``rank`` (the final ``rank_by`` value of the distilled student; None when it never got there),
``global_step``, ``reports``, ``wall_seconds`` (Tune's total trial time, over restarts),
``final`` (the final evaluation: ``rouge_l``, ``parse_rate``, ``retention``,
``rouge_l/<category>`` ...), ``history`` (``[global_step, metric]`` per reported step),
``error``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from raykd.atomic import atomic_write_json, atomic_write_text

FINAL_KEYS = ("rouge_l", "parse_rate", "retention", "teacher_rouge_l", "wall_seconds",
              "reserved_bundles", "pass_at_1", "format_rate")  # fmt: skip


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def trial_records(grid, setup: dict, metric: str, rank_by: str) -> list[dict]:
    """One record per trial of a Tune ``ResultGrid`` (see the module docstring)."""
    from raykd.tune.trial import run_name_of

    records = []
    for result in grid:
        m = dict(result.metrics or {})
        config = result.config or {}
        trial_id = m.get("trial_id") or Path(result.path).name
        if result.error is not None:
            status = "error"
        elif m.get("pipeline_done"):
            status = "completed"
        elif m:
            status = "stopped"
        else:
            status = "pending"
        by_step: dict[int, float] = {}  # a step reported again after a restore: the latest
        df = result.metrics_dataframe
        if df is not None and metric in df.columns and "global_step" in df.columns:
            for step, value in zip(df["global_step"], df[metric]):
                if _num(step) is not None and _num(value) is not None:
                    by_step[int(step)] = float(value)
        history = [[s, v] for s, v in sorted(by_step.items())]
        run_name = run_name_of(config, trial_id) if config else trial_id
        variants = config.get("variants") or {}
        group = m.get("group")
        if group is None:
            key = setup["group_by"]
            group = variants.get(key, (config.get("params") or {}).get(key, "all"))
        records.append(
            {
                "trial_id": trial_id,
                "run_name": run_name,
                "run_dir": m.get("run_dir") or str(Path(setup["trials_dir"]) / run_name),
                "group": str(group),
                "params": {**(config.get("params") or {}), **variants},
                "status": status,
                "metric": _num(m.get(metric)),
                "rank": _num(m.get(rank_by)) if status == "completed" else None,
                "global_step": int(m.get("global_step") or 0),
                "reports": len(history),
                "wall_seconds": round(_num(m.get("time_total_s")) or 0.0, 1),
                "final": {
                    k: v for k, v in m.items() if k in FINAL_KEYS or k.startswith("rouge_l/")
                },
                "history": history,
                "error": str(result.error).splitlines()[0][:300] if result.error else None,
            }
        )
    return sorted(records, key=lambda r: r["trial_id"])


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def best_per_group(records: list[dict], metric_mode: str, rank_mode: str) -> dict[str, dict]:
    """Per group, the completed trial with the best ``rank``; in a group where no trial has
    one, the trial with the best last ``metric`` (marked ``by: metric``)."""
    out: dict[str, dict] = {}
    for group in sorted({r["group"] for r in records}):
        mine = [r for r in records if r["group"] == group]
        for key, mode in (("rank", rank_mode), ("metric", metric_mode)):
            best = None
            for r in mine:
                if r[key] is not None and (best is None or _better(r[key], best[key], mode)):
                    best = r
            if best is not None:
                out[group] = {"trial_id": best["trial_id"], "by": key, "value": best[key],
                              "params": best["params"], "run_dir": best["run_dir"]}  # fmt: skip
                break
    return out


def build_summary(records: list[dict], spec: dict) -> dict:
    """The summary as JSON-ready data. ``spec``: ``name``, ``metric``, ``mode``, ``rank_by``,
    ``rank_mode``, ``group_by``, ``eval_every``, ``scheduler``."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {
        "sweep": spec["name"],
        "metric": spec["metric"],
        "mode": spec["mode"],
        "rank_by": spec["rank_by"],
        "rank_mode": spec["rank_mode"],
        "group_by": spec["group_by"],
        "eval_every": spec.get("eval_every"),
        "scheduler": spec.get("scheduler"),
        "counts": counts,
        "best": best_per_group(records, spec["mode"], spec["rank_mode"]),
        "trials": records,
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary_markdown(summary: dict, plot: str | None = "summary.png") -> str:
    """The summary as Markdown: counts, best per group, every trial."""
    s, trials = summary, summary["trials"]
    keys = sorted({k for r in trials for k in r["params"]} - {s["group_by"]})
    counts = ", ".join(f"{n} {status}" for status, n in sorted(s["counts"].items()))
    lines = [
        f"# Sweep `{s['sweep']}`",
        "",
        f"{len(trials)} trials ({counts}). During training: `{s['metric']}` ({s['mode']}) "
        f"every {s['eval_every']} steps, scheduler {s['scheduler']}. Best per "
        f"`{s['group_by']}`: final `{s['rank_by']}` of the distilled student ({s['rank_mode']}).",
        "",
        f"## Best per `{s['group_by']}`",
        "",
        f"| {s['group_by']} | trial | by | value | params |",
        "|---|---|---|---:|---|",
    ]
    for group, b in s["best"].items():
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in b["params"].items())
        by = s["rank_by"] if b["by"] == "rank" else s["metric"]
        lines.append(f"| {group} | {b['trial_id']} | {by} | {_fmt(b['value'])} | {params} |")
    head = ["trial", s["group_by"], *keys, "status", s["metric"], s["rank_by"], "parse_rate",
            "steps", "wall s"]  # fmt: skip
    lines += ["", "## All trials", "", "| " + " | ".join(head) + " |",
              "|" + "---|" * len(head)]  # fmt: skip
    for r in trials:
        row = [r["trial_id"], r["group"], *(r["params"].get(k) for k in keys), r["status"],
               r["metric"], r["rank"], r["final"].get("parse_rate"), r["global_step"],
               r["wall_seconds"]]  # fmt: skip
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    errors = [r for r in trials if r["error"]]
    if errors:
        lines += ["", "## Failed trials", ""]
        lines += [f"- {r['trial_id']}: {r['error']}" for r in errors]
    cats = sorted({k for r in trials for k in r["final"] if k.startswith("rouge_l/")})
    if cats:
        lines += ["", "## Rouge-L per Dolly category (final student)", "",
                  "| trial | " + " | ".join(c.split("/", 1)[1] for c in cats) + " |",
                  "|---|" + "---:|" * len(cats)]  # fmt: skip
        for r in trials:
            if any(c in r["final"] for c in cats):
                vals = " | ".join(_fmt(r["final"].get(c)) for c in cats)
                lines.append(f"| {r['trial_id']} | {vals} |")
    if plot:
        lines += ["", f"![{s['metric']} per trial]({plot})"]
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict, path: Path) -> None:
    """Left: the sweep metric against global step per trial (dashed: stopped early); right:
    the final ``rank_by`` per completed trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = summary["trials"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {g: f"C{i}" for i, g in enumerate(sorted({r["group"] for r in trials}))}
    for r in trials:
        if r["history"]:
            xs, ys = zip(*r["history"])
            style = "--" if r["status"] != "completed" else "-"
            left.plot(xs, ys, style, marker="o", color=colors[r["group"]],
                      label=f"{r['trial_id']} ({r['group']}, {r['status']})")  # fmt: skip
    left.set_xlabel("global step")
    left.set_ylabel(summary["metric"])
    left.set_title(f"{summary['metric']} during training")
    if any(r["history"] for r in trials):
        left.legend(fontsize=7)
    done = [r for r in trials if r["rank"] is not None]
    right.bar(range(len(done)), [r["rank"] for r in done],
              color=[colors[r["group"]] for r in done])  # fmt: skip
    right.set_xticks(range(len(done)), [r["trial_id"] for r in done], rotation=45, fontsize=7)
    right.set_ylabel(summary["rank_by"])
    right.set_title(f"final {summary['rank_by']} (completed trials)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def write_summary(summary: dict, out_dir: str | Path) -> dict[str, str]:
    """Write ``summary.json``, ``summary.md`` and ``summary.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"summary.{k}" for k in ("json", "md", "png")}
    atomic_write_json(paths["json"], summary)
    plot_summary(summary, paths["png"])
    atomic_write_text(paths["md"], summary_markdown(summary, paths["png"].name))
    return {k: str(v) for k, v in paths.items()}
