"""Run report: ``report.md`` (tables and samples), ``report.json`` and ``report.png``.

``results`` schema (every field except ``models`` is optional; so is each model field)::

    {
      "task": "stdlib_code", "kind": "code" | "text",
      "models": {
        "teacher":        {"rouge_l": 41.2, "parse_rate": 88.0, "params": 134515008,
                           "size_mb": 270.0, (code tasks with tests:) "pass_at_1": 12.5,
                           "pass_at_1_stderr": 3.4, "sampled_pass_at_5": 30.1,
                           "format_rate": 97.0, "reasoning_words": 0.0,
                           "samples": [{"prompt": ..., "prediction": ..., "reference": ...}]},
        "student_before": {...}, "student_after": {...}, <any other model>: {...}
      },
      "stages": {"sft": {"steps": 200, "seconds": 61.0, "final_loss": 0.91}, ...},
      "compression": {"teacher_params": ..., "student_params": ..., "layers": "24/30"},
      "quantization": {"settings": {"bits": 4, "group_size": 32, ...}, "calibration": 64,
                       "rows": [{"model": "student_after", "method": "float", "size_mb": ...,
                                 "params": ..., "load_seconds": ..., "tokens_per_second": ...,
                                 "greedy_agreement": ..., "rouge_l": ..., ...}, ...]}
    }

``curves`` maps a training stage to its ``(step, loss)`` points.  Retention (share of the
teacher's Rouge-L and parse rate a student keeps) is computed here for every model but
the teacher.  All files are written atomically (temporary file, then ``os.replace``), so a
crash never leaves a half-written report.
"""

from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from raykd.atomic import atomic_write
from raykd.evaluate.metrics import retention

TEACHER = "teacher"
#: Models shown first, in this order; any other models follow in their given order.
MODEL_ORDER: tuple[str, ...] = (
    "stub", "teacher_base", TEACHER, "student_before", "student_after")  # fmt: skip


def _num(value: Any) -> float:
    """``value`` as a float, ``nan`` if missing or not numeric."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: Any, digits: int = 1) -> str:
    number = _num(value)
    return "—" if not math.isfinite(number) else f"{number:.{digits}f}"


def _fmt_params(value: Any) -> str:
    number = _num(value)
    if not math.isfinite(number):
        return "—"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(number) >= scale:
            return f"{number / scale:.1f}{suffix}"
    return f"{number:.0f}"


def _fmt_any(value: Any) -> str:
    if isinstance(value, float):
        return _fmt(value, 3)
    return html.escape(str(value)).replace("|", "\\|")


def _cell(text: Any, limit: int = 400) -> str:
    """Multi-line text as one Markdown table cell (HTML-escaped, indentation kept)."""
    text = "" if text is None else str(text)
    if len(text) > limit:
        text = text[:limit] + " …"
    lines = []
    for line in html.escape(text).split("\n"):
        stripped = line.lstrip(" ")
        lines.append("&nbsp;" * (len(line) - len(stripped)) + stripped)
    return "<br>".join(lines).replace("|", "&#124;") or "—"


def _jsonable(value: Any) -> Any:
    """Replace non-finite floats by ``None`` (JSON has no NaN) and tuples by lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _ordered_models(models: Mapping[str, Any]) -> list[str]:
    first = [name for name in MODEL_ORDER if name in models]
    return first + [name for name in models if name not in MODEL_ORDER]


def summarize(results: Mapping[str, Any], curves: Mapping[str, Any] | None = None) -> dict:
    """Normalise ``results`` (model order, size in MB, retention) and attach ``curves``."""
    raw_models = results.get("models") or {}
    teacher = raw_models.get(TEACHER) or {}
    models: dict[str, dict] = {}
    for name in _ordered_models(raw_models):
        entry = dict(raw_models[name] or {})
        if "size_mb" not in entry and "size_bytes" in entry:
            entry["size_mb"] = _num(entry["size_bytes"]) / 1e6
        entry.setdefault("samples", [])
        if name != TEACHER:
            entry["retention"] = retention(_num(entry.get("rouge_l")), _num(teacher.get("rouge_l")))
            entry["retention_parse_rate"] = retention(
                _num(entry.get("parse_rate")), _num(teacher.get("parse_rate"))
            )
        models[name] = entry
    stages = {name: dict(info or {}) for name, info in (results.get("stages") or {}).items()}
    points = {name: [[int(s), float(v)] for s, v in pts] for name, pts in (curves or {}).items()}
    for name, pts in points.items():  # a stage known only from its curve still gets a row
        stage = stages.setdefault(name, {})
        if pts and stage.get("final_loss") is None:
            stage["final_loss"] = pts[-1][1]
    return {
        **{k: v for k, v in results.items() if k not in ("models", "stages")},
        "task": results.get("task", "unknown"),
        "kind": results.get("kind", "text"),
        "models": models,
        "stages": stages,
        "compression": dict(results.get("compression") or {}),
        "curves": points,
    }


def render_markdown(summary: Mapping[str, Any], num_samples: int = 3) -> str:
    """The Markdown report for a :func:`summarize` result."""
    models: dict[str, dict] = summary["models"]
    out = [f"# raykd report — {summary['task']} ({summary['kind']})", ""]
    executed = any(m.get("pass_at_1") is not None for m in models.values())
    stops = any(m.get("clean_stop_rate") is not None for m in models.values())
    humaneval = any(m.get("humaneval") for m in models.values())
    exec_head = " pass@1 | sampled pass@k | format | reasoning words |" if executed else ""
    extra = int(stops) + int(humaneval)
    out += [
        "| model | Rouge-L | parse rate |" + (" clean stop |" if stops else "") + exec_head
        + (" HumanEval pass@1 |" if humaneval else "") + " retention vs teacher | params "
        "| size MB |",
        "|---|---:|---:|" + "---:|" * ((4 if executed else 0) + extra) + "---:|---:|---:|",
    ]  # fmt: skip
    code = summary["kind"] == "code"
    for name, m in models.items():
        parse = _fmt(m.get("parse_rate")) if code or "parse_rate" in m else "—"
        ret = "—" if name == TEACHER else _fmt(m.get("retention"))
        cells = f" {_fmt(m.get('clean_stop_rate'))} |" if stops else ""
        cells += _exec_cells(m) if executed else ""
        if humaneval:
            he = m.get("humaneval") or {}
            cells += f" {_fmt(he.get('pass_at_1'))} |" if he else " — |"
        out.append(
            f"| {name} | {_fmt(m.get('rouge_l'))} | {parse} |{cells} {ret} "
            f"| {_fmt_params(m.get('params'))} | {_fmt(m.get('size_mb'))} |"
        )
    if not models:
        out.append("| (no models evaluated) | — | — | — | — | — |")
    out += ["", "Rouge-L is F1 x 100; retention is 100 x student Rouge-L / teacher Rouge-L."]
    if stops:
        out += ["clean stop: % of answers that are one function (bare, or one fenced block) "
                "and then the end of turn; `stub` is the requested signature with a `pass` "
                "body (no model), the floor every other row must beat."]  # fmt: skip
    if humaneval:
        he_n = next(m["humaneval"].get("num_examples") for m in models.values()
                    if m.get("humaneval"))  # fmt: skip
        out += [f"HumanEval pass@1: % of its {he_n} problems whose greedy answer passes the "
                "problem's tests in the sandbox."]  # fmt: skip
    if executed:
        out += ["pass@1: % of problems whose greedy answer passes all its tests in the sandbox "
                "(± binomial standard error); sampled pass@k: unbiased estimator "
                "1 - C(n-c,k)/C(n,k) over n sampled decodes; format: % of answers in the "
                "task's format; reasoning words: mean words inside <think>."]  # fmt: skip
    out.append("")

    out += ["## Training stages", ""]
    if summary["stages"]:
        out += ["| stage | steps | seconds | final loss |", "|---|---:|---:|---:|"]
        for name, st in summary["stages"].items():
            steps = st.get("steps")
            out.append(
                f"| {name} | {steps if steps is not None else '—'} | {_fmt(st.get('seconds'))} "
                f"| {_fmt(st.get('final_loss'), 4)} |"
            )
    else:
        out.append("No training stages recorded.")
    out.append("")

    if summary["compression"]:
        out += ["## Compression", "", "| key | value |", "|---|---|"]
        out += [f"| {k} | {_fmt_any(v)} |" for k, v in summary["compression"].items()]
        out.append("")

    out += _quantization_section(summary.get("quantization"))

    with_samples = [name for name, m in models.items() if m.get("samples")]
    if with_samples and num_samples > 0:
        out += ["## Sample generations", ""]
        count = min(num_samples, max(len(models[n]["samples"]) for n in with_samples))
        for i in range(count):
            first = next(
                models[n]["samples"][i] for n in with_samples if len(models[n]["samples"]) > i
            )
            out += [f"### Sample {i + 1}", "", "**Prompt:** " + _cell(first.get("prompt")), ""]
            out.append("| reference | " + " | ".join(with_samples) + " |")
            out.append("|---" * (len(with_samples) + 1) + "|")
            preds = [
                _cell(models[n]["samples"][i].get("prediction"))
                if len(models[n]["samples"]) > i
                else "—"
                for n in with_samples
            ]
            out.append(f"| {_cell(first.get('reference'))} | " + " | ".join(preds) + " |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _quantization_section(quant: Mapping[str, Any] | None) -> list[str]:
    """The quantization table: one row per model (float student, then each method)."""
    if not quant or not quant.get("rows"):
        return []
    st = quant.get("settings") or {}
    grid = "symmetric" if st.get("sym") else "asymmetric"
    out = [
        "## Quantization",
        "",
        f"{st.get('bits')}-bit weights, group size {st.get('group_size')}, {grid}, act-order "
        f"{'on' if st.get('act_order') else 'off'}; GPTQ calibrated on "
        f"{quant.get('calibration')} train texts. Same eval examples for every row.",
        "",
        "| model | method | size MB | % of float | params | load s | peak load MB "
        "| tokens/s | greedy agreement % | Rouge-L | parse rate | pass@1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in quant["rows"]:
        out.append(
            f"| {r.get('model')} | {r.get('method')} | {_fmt(r.get('size_mb'))} "
            f"| {_fmt(r.get('size_percent'))} | {_fmt_params(r.get('params'))} "
            f"| {_fmt(r.get('load_seconds'), 2)} | {_fmt(r.get('load_peak_rss_mb'), 0)} "
            f"| {_fmt(r.get('tokens_per_second'))} | {_fmt(r.get('greedy_agreement'))} "
            f"| {_fmt(r.get('rouge_l'))} | {_fmt(r.get('parse_rate'))} "
            f"| {_fmt(r.get('pass_at_1'))} |"
        )
    out += [
        "",
        "Size: weight files on disk. Params: logical parameters (packed codes counted as the "
        "weights they encode). Load, peak load memory (RSS growth) and tokens/s (greedy, "
        "batch 1): each model in a fresh worker process. Greedy agreement: % of the measured "
        "prompts whose continuation equals the float student's.",
        "",
    ]
    return out


def _exec_cells(m: Mapping[str, Any]) -> str:
    """The execution columns of one model row: pass@1 ± stderr, sampled pass@k, format,
    reasoning words."""
    if m.get("pass_at_1") is None:
        return " — | — | — | — |"
    p1 = f"{_fmt(m['pass_at_1'])} ± {_fmt(m.get('pass_at_1_stderr'))}"
    ks = sorted(int(k.rsplit("_", 1)[1]) for k in m if k.startswith("sampled_pass_at_"))
    sampled = ", ".join(f"@{k} {_fmt(m[f'sampled_pass_at_{k}'])}" for k in ks) or "—"
    return (f" {p1} | {sampled} | {_fmt(m.get('format_rate'))} "
            f"| {_fmt(m.get('reasoning_words'))} |")  # fmt: skip


def render_png(summary: Mapping[str, Any]) -> bytes:
    """PNG bytes: one loss-curve panel per training stage plus a bar panel of eval scores."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg regardless of env

    curves = {name: pts for name, pts in summary["curves"].items() if pts}
    panels = len(curves) + 1
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.4 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, pts) in zip(axes, curves.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=1.2)
        ax.set(title=f"{name} loss", xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)

    bar_ax = axes[len(curves)]
    names = list(summary["models"])
    metrics = [("rouge_l", "Rouge-L")]
    if summary["kind"] == "code" or any("parse_rate" in m for m in summary["models"].values()):
        metrics.append(("parse_rate", "parse rate"))
    if any(m.get("pass_at_1") is not None for m in summary["models"].values()):
        metrics.append(("pass_at_1", "pass@1"))
    width = 0.8 / len(metrics)
    for j, (key, label) in enumerate(metrics):
        values = [_num(summary["models"][n].get(key)) for n in names]
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(names))]
        bars = bar_ax.bar(xs, [v if math.isfinite(v) else 0.0 for v in values], width, label=label)
        bar_ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=7)
    bar_ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    bar_ax.set(title="eval scores", ylabel="score (0-100)", ylim=(0, 110))
    bar_ax.legend(fontsize=8)
    if not names:
        bar_ax.text(0.5, 0.5, "no models evaluated", ha="center", va="center")
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_report(
    run_dir: str | Path,
    results: Mapping[str, Any],
    curves: Mapping[str, list[tuple[int, float]]] | None = None,
    *,
    num_samples: int = 3,
) -> Path:
    """Write ``report.md``, ``report.json`` and ``report.png`` into ``run_dir``.

    Args:
        run_dir: Output directory (created if missing).
        results: Evaluation results, schema in the module docstring.
        curves: ``{stage: [(step, loss), ...]}`` for the loss panels.
        num_samples: Sample generations shown per model in the Markdown report.

    Returns:
        The path of ``report.md``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results, curves)
    atomic_write(
        run_dir / "report.json",
        json.dumps(_jsonable(summary), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
    )
    atomic_write(run_dir / "report.png", render_png(summary))
    md_path = run_dir / "report.md"
    atomic_write(md_path, render_markdown(summary, num_samples))
    return md_path
