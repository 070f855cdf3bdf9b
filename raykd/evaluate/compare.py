"""Compare finished runs on one held-out set: a table, paired differences and a plot.

``raykd compare RUN_DIR...`` reads each run directory (``config.yaml``, ``stages/*.json``,
``eval/*.json``; nothing is recomputed) and answers "which recipe keeps most of the teacher per
minute of training":

* one row per run for its final student (``student_after``): the student's method (its
  training stages' algorithms), seed, non-embedding parameters, training minutes (wall-clock
  of its student stages, teacher scoring inside them included), Rouge-L, retention
  ``100 * RougeL(student) / RougeL(tuned teacher)``, the valid-code and clean-stop rates and
  the HumanEval pass@1 when the run measured it;
* the reference rows every run shares (``teacher``: the tuned teacher, ``teacher_base``,
  ``student_before``, ``stub``), taken from whichever run evaluated them;
* per method, the mean and spread over seeds, and the paired Rouge-L difference between
  methods on the same examples (per-example scores averaged over seeds first):
  ``mean_i (a_i - b_i)`` with standard error ``sd(a - b) / sqrt(n)``;
* a plot of retention against training minutes: ``student_before`` at 0 minutes, each run's
  student at its minutes, the 90% goal and the stub as lines.

Runs compare only when they were scored against the same held-out examples and the same
teacher: :func:`compare_runs` refuses otherwise and names the runs and the differing setting.
"""

from __future__ import annotations

import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from raykd.atomic import atomic_write
from raykd.evaluate.metrics import retention
from raykd.evaluate.report import _fmt as _f
from raykd.evaluate.report import _fmt_params as _params
from raykd.rundir import RunDir

#: Shared rows, in the order the table shows them.
REFERENCE_ROWS = ("teacher", "teacher_base", "student_before", "stub")
#: Data settings that decide which examples are held out (with the effective split seed).
EVAL_SET_KEYS = ("task", "path", "max_length", "num_eval", "eval_fraction", "eval_task",
                 "eval_path", "system_prompt")  # fmt: skip
BEGIN, END = "<!-- raykd-compare:begin -->", "<!-- raykd-compare:end -->"


@dataclass
class RunView:
    """What one run directory recorded."""

    root: Path
    config: dict
    models: dict[str, dict] = field(default_factory=dict)  # eval label -> eval record
    stages: dict[str, dict] = field(default_factory=dict)  # training stage -> summary
    student: dict = field(default_factory=dict)  # stages/student.json: how it was built

    def non_embedding(self, label: str) -> int | None:
        """Non-embedding parameters of a row's model (from how the student was built)."""
        if label == "stub":
            return None
        key = "teacher_params" if label.startswith("teacher") else "params"
        return (self.student.get(key) or {}).get("non_embedding")

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def student_stages(self) -> list[dict]:
        entries = (self.config.get("pipeline") or {}).get("stages") or []
        return [s for s in entries if s.get("trains", "student") == "student"]

    @property
    def method(self) -> str:
        return "+".join(s["algorithm"] for s in self.student_stages) or "none"

    @property
    def seed(self) -> int:
        return int((self.config.get("run") or {}).get("seed", 0))

    def eval_set(self) -> dict:
        data = self.config.get("data") or {}
        split = data.get("split_seed")
        return {**{k: data.get(k) for k in EVAL_SET_KEYS},
                "split_seed": self.seed if split is None else split}  # fmt: skip

    def teacher_path(self) -> str | None:
        """The model the run called its teacher (the tuned one when it tuned one)."""
        if "teacher" in self.models:
            return self.models["teacher"].get("model_path")
        return (self.config.get("teacher") or {}).get("model")

    def train_minutes(self) -> float:
        names = [s["name"] for s in self.student_stages]
        return sum(float(self.stages.get(n, {}).get("seconds", math.nan)) for n in names) / 60.0

    def phase_minutes(self) -> dict[str, float]:
        """Where the student stages' minutes went: the sum over logged steps of each
        ``time/<phase>`` metric, and ``setup`` (stage wall-clock minus its steps: building the
        roles, first targets, saving the model)."""
        metrics = RunDir(self.root)
        out: dict[str, float] = {}
        steps = 0.0
        for stage in self.student_stages:
            for row in metrics.read_metrics(stage["name"]):
                steps += float(row.get("time/step", 0.0)) / 60.0
                for key, value in row.items():
                    if key.startswith("time/") and key != "time/step":
                        out[key[5:]] = out.get(key[5:], 0.0) + float(value) / 60.0
        out["setup"] = max(0.0, self.train_minutes() - steps)
        return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON result ({exc})") from exc


def load_run(root: str | Path) -> RunView:
    """Read a run directory; ValueError naming the path when it is not one."""
    root = Path(root)
    cfg_path = root / "config.yaml"
    if not cfg_path.is_file():
        raise ValueError(f"{root}: not a raykd run directory (no config.yaml)")
    config = yaml.safe_load(cfg_path.read_text()) or {}
    view = RunView(root=root, config=config)
    for p in sorted((root / "eval").glob("*.json")):
        view.models[p.stem] = _read_json(p)
    for p in sorted((root / "stages").glob("*.json")):
        if p.stem == "student":
            view.student = _read_json(p)
        elif p.stem != "data":
            view.stages[p.stem] = _read_json(p)
    return view


def _humaneval(model: Mapping) -> float | None:
    return (model.get("humaneval") or {}).get("pass_at_1")


def _row(label: str, model: Mapping, teacher_rouge: float | None, **extra) -> dict:
    return {
        "label": label,
        "rouge_l": model.get("rouge_l"),
        "retention": retention(model.get("rouge_l"), teacher_rouge),
        "parse_rate": model.get("parse_rate"),
        "clean_stop_rate": model.get("clean_stop_rate"),
        "pass_at_1": model.get("pass_at_1"),
        "humaneval_pass_at_1": _humaneval(model),
        "num_examples": len(model.get("per_example") or []),
        **extra,
    }


def _check_same(views: Sequence[RunView], what: str, values: list) -> None:
    first = values[0]
    for view, value in zip(views, values):
        if value != first:
            raise ValueError(
                f"runs {views[0].root} and {view.root} differ in {what} ({first!r} vs "
                f"{value!r}): their scores are not comparable"
            )


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """``(mean_i (a_i - b_i), sd(a - b) / sqrt(n))`` over paired per-example scores."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need equal, non-empty lists (got {len(a)} and {len(b)})")
    diffs = [x - y for x, y in zip(a, b)]
    sem = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return statistics.fmean(diffs), sem


def compare_runs(views: Sequence[RunView]) -> dict:
    """The comparison of :mod:`raykd.evaluate.compare` (see the module docstring)."""
    if not views:
        raise ValueError("compare needs at least one run directory")
    _check_same(
        views, "the held-out set (data settings, split seed)", [v.eval_set() for v in views]
    )
    _check_same(views, "the teacher", [str(Path(v.teacher_path() or "")) for v in views])
    shared: dict[str, tuple[RunView, dict]] = {}
    for view in views:
        for label in REFERENCE_ROWS:
            if label in view.models and label not in shared:
                shared[label] = (view, view.models[label])
    if "teacher" not in shared:
        raise ValueError("no run evaluated the teacher (pipeline.eval_teacher): nothing to "
                         "measure retention against")  # fmt: skip
    teacher_rouge = shared["teacher"][1].get("rouge_l")
    references = [_row(label, model, teacher_rouge, run=view.name, minutes=0.0,
                       non_embedding=view.non_embedding(label))
                  for label, (view, model) in shared.items()]  # fmt: skip
    runs = []
    for view in views:
        if "student_after" not in view.models:
            raise ValueError(f"{view.root}: no eval/student_after.json (the run is unfinished "
                             "or trained no student)")  # fmt: skip
        runs.append(_row(view.name, view.models["student_after"], teacher_rouge, run=view.name,
                         method=view.method, seed=view.seed,
                         non_embedding=view.non_embedding("student_after"),
                         minutes=round(view.train_minutes(), 1),
                         phases=view.phase_minutes()))  # fmt: skip
    methods: dict[str, list[dict]] = {}
    for row in runs:
        methods.setdefault(row["method"], []).append(row)
    summary = {}
    for method, rows in methods.items():
        entry = {"seeds": [r["seed"] for r in rows]}
        for key in ("rouge_l", "retention", "parse_rate", "clean_stop_rate", "minutes",
                    "humaneval_pass_at_1"):  # fmt: skip
            vals = [float(r[key]) for r in rows if r.get(key) is not None]
            entry[key] = statistics.fmean(vals) if vals else None
            entry[f"{key}_spread"] = (max(vals) - min(vals)) if len(vals) > 1 else None
        summary[method] = entry
    per_method = {m: _mean_per_example([v for v in views if v.method == m]) for m in methods}
    paired = []
    names = sorted(methods)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            mean, sem = paired_difference(per_method[a], per_method[b])
            paired.append({"a": a, "b": b, "mean": mean, "stderr": sem,
                           "n": len(per_method[a])})  # fmt: skip
    return {"teacher_rouge_l": teacher_rouge, "references": references, "runs": runs,
            "methods": summary, "paired": paired}  # fmt: skip


def _mean_per_example(views: Sequence[RunView]) -> list[float]:
    lists = [[e["rouge_l"] for e in v.models["student_after"]["per_example"]] for v in views]
    if len({len(x) for x in lists}) != 1:
        raise ValueError(f"runs {[str(v.root) for v in views]} scored different example counts")
    return [statistics.fmean(col) for col in zip(*lists)]


def render_markdown(result: Mapping) -> str:
    """The tables of :func:`compare_runs` as markdown."""
    head = ("| model | run | seed | non-emb. params | train min | Rouge-L | retention % | "
            "valid % | clean stop % | HumanEval pass@1 % |")  # fmt: skip
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["references"]:
        lines.append(
            f"| {r['label']} | {r['run']} | — | {_params(r['non_embedding'])} | — | "
            f"{_f(r['rouge_l'])} | {_f(r['retention'])} | {_f(r['parse_rate'])} | "
            f"{_f(r['clean_stop_rate'])} | {_f(r['humaneval_pass_at_1'])} |"
        )
    for r in result["runs"]:
        lines.append(
            f"| student ({r['method']}) | {r['run']} | {r['seed']} | "
            f"{_params(r['non_embedding'])} | {_f(r['minutes'])} | {_f(r['rouge_l'])} | "
            f"{_f(r['retention'])} | {_f(r['parse_rate'])} | {_f(r['clean_stop_rate'])} | "
            f"{_f(r['humaneval_pass_at_1'])} |"
        )
    n = result["runs"][0]["num_examples"] if result["runs"] else 0
    lines += ["", f"Per method (mean over seeds; ± half the range between seeds; {n} held-out "
              "examples each):", "",
              "| method | seeds | train min | Rouge-L | retention % | valid % | clean stop % |",
              "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip

    def pm(entry: Mapping, key: str) -> str:
        spread = entry.get(f"{key}_spread")
        return _f(entry[key]) + ("" if spread is None else f" ± {_f(spread / 2)}")

    for method, e in result["methods"].items():
        seeds = ", ".join(str(s) for s in e["seeds"])
        lines.append(f"| {method} | {seeds} | {_f(e['minutes'])} | {pm(e, 'rouge_l')} | "
                     f"{pm(e, 'retention')} | {pm(e, 'parse_rate')} | "
                     f"{pm(e, 'clean_stop_rate')} |")  # fmt: skip
    phases = sorted({k for r in result["runs"] for k in r.get("phases", {})})
    if phases:
        lines += ["", "Where each run's training minutes went (sum of its per-step phase "
                  "timings; `setup`: the rest of the stage's wall-clock):", "",
                  "| run | " + " | ".join(phases) + " |",
                  "|---|" + "---:|" * len(phases)]  # fmt: skip
        for r in result["runs"]:
            cells = " | ".join(_f(r["phases"].get(k)) for k in phases)
            lines.append(f"| {r['run']} | {cells} |")
    if result["paired"]:
        lines += ["", "Paired Rouge-L differences on the same examples (a − b, ± standard "
                  "error):", ""]  # fmt: skip
        lines += [f"- {p['a']} − {p['b']}: {p['mean']:+.2f} ± {p['stderr']:.2f} "
                  f"(n = {p['n']})" for p in result["paired"]]  # fmt: skip
    return "\n".join(lines) + "\n"


def render_png(result: Mapping, title: str = "") -> bytes:
    """PNG bytes: retention of the tuned teacher's Rouge-L vs training minutes per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    refs = {r["label"]: r for r in result["references"]}
    start = refs.get("student_before", {}).get("retention")
    for i, (method, entry) in enumerate(result["methods"].items()):
        color = f"C{i}"
        rows = [r for r in result["runs"] if r["method"] == method]
        ax.scatter([r["minutes"] for r in rows], [r["retention"] for r in rows], color=color,
                   alpha=0.6, s=18)  # fmt: skip
        xs, ys = [entry["minutes"]], [entry["retention"]]
        if start is not None and math.isfinite(start):
            xs, ys = [0.0, *xs], [start, *ys]
        ax.plot(xs, ys, color=color, marker="o", label=method)
    ax.axhline(90.0, color="grey", linestyle="--", linewidth=1, label="goal 90%")
    for label, style in (("stub", ":"), ("teacher_base", "-.")):
        value = refs.get(label, {}).get("retention")
        if value is not None and math.isfinite(value):
            ax.axhline(value, color="black", linestyle=style, linewidth=1, label=label)
    ax.set(xlabel="student training minutes (2 CPU cores, teacher scoring included)",
           ylabel="% of tuned teacher's Rouge-L", title=title or "retention vs training time",
           ylim=(0, 110))  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def splice(document: str, block: str) -> str:
    """``document`` with the text between :data:`BEGIN` and :data:`END` replaced by ``block``."""
    if BEGIN not in document or END not in document:
        raise ValueError(f"the markdown file has no {BEGIN} ... {END} markers to fill")
    head, rest = document.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def write_comparison(run_dirs: Sequence[str | Path], markdown: str | Path | None = None,
                     png: str | Path | None = None, title: str = "") -> dict:  # fmt: skip
    """Compare ``run_dirs``; fill the markers of ``markdown`` (or create it with the tables)
    and write the plot to ``png``. Returns the comparison."""
    result = compare_runs([load_run(p) for p in run_dirs])
    block = render_markdown(result)
    if markdown is not None:
        path = Path(markdown)
        text = splice(path.read_text(), block) if path.exists() else f"{BEGIN}\n{block}{END}\n"
        atomic_write(path, text.encode())
    if png is not None:
        atomic_write(Path(png), render_png(result, title))
    return result
