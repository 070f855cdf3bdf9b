"""One sweep trial: a whole raykd pipeline inside the trial's placement group.

Tune calls :func:`run_trial` with the trial's point (``config["params"]``: space values,
``config["variants"]``: a label per variant axis) and the sweep's fixed settings
(``config["setup"]``). The trial

1. builds its run config with :func:`raykd.config.load_config` (the sweep's files and
   overrides, then the point, then ``run.output_dir=<sweep>/trials`` and ``run.name``), so its
   run directory is a normal raykd run directory that resumes like ``raykd run``;
2. maps the placement group Tune reserved for it (:func:`trial_resources`: a driver bundle for
   the trial itself and every role's bundles, :func:`raykd.pipeline.resources.run_bundles`)
   into a :class:`~raykd.roles.factory.SlotPlacement`, so every role actor lives inside the
   trial's reservation;
3. reports to Tune at every held-out eval of training (``heldout_ce`` every ``eval_every``
   steps and at each stage's end, by :class:`TuneReporter`; ASHA acts on these), with a tiny
   checkpoint (the last reported step), and once more at the end with the final evaluation
   (``rouge_l``, ``parse_rate``, ``retention``, per-category Rouge-L on Dolly) and
   ``pipeline_done = 1``.

A trial restarted by Tune (a retry after a failure, or ``Tuner.restore`` after the driver died)
runs the same pipeline again: finished stages are skipped, a stage resumes from its last raykd
checkpoint, and steps Tune has already seen are not reported twice.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from omegaconf import OmegaConf
from ray import tune
from ray.tune import Checkpoint
from ray.tune.execution.placement_groups import PlacementGroupFactory
from ray.util import get_current_placement_group

from raykd.algorithms.common import console_reporter
from raykd.config import load_config, split_seed
from raykd.pipeline.resources import run_bundles, slot_indices
from raykd.roles.factory import SlotPlacement
from raykd.tune.spec import point_overrides, stage_offsets, total_steps

STATE_FILE = "raykd_trial.json"


def trial_config(config: dict, run_name: str = "trial"):
    """The run config of one trial (``config``: what Tune passes to the trainable)."""
    setup = config["setup"]
    extra = point_overrides(
        config.get("params") or {}, config.get("variants") or {}, setup["variants"]
    )
    overrides = [*setup["overrides"], *extra, f"run.output_dir={json.dumps(setup['trials_dir'])}",
                 f"run.name={json.dumps(run_name)}"]  # fmt: skip
    return load_config(setup["files"], overrides)


def trial_resources(config: dict) -> PlacementGroupFactory:
    """What Tune reserves for a trial: ``[driver bundle, *every role's bundles]``, packed."""
    return PlacementGroupFactory(run_bundles(trial_config(config)), strategy="PACK")


def group_value(config: dict, cfg) -> str:
    """The trial's value of the sweep's ``group_by`` (a variant label or a config value)."""
    key = config["setup"]["group_by"]
    if key in (config.get("variants") or {}):
        return str(config["variants"][key])
    if key in (config.get("params") or {}):
        return str(config["params"][key])
    return str(OmegaConf.select(cfg, key))


def group_of_config(config: dict) -> str:
    """The trial's group from its Tune config alone (a variant label or a swept value; one
    group ``all`` when ``group_by`` is a fixed config key)."""
    key = (config.get("setup") or {}).get("group_by")
    for table in (config.get("variants") or {}, config.get("params") or {}):
        if key in table:
            return str(table[key])
    return "all"


def run_name_of(config: dict, trial_id: str) -> str:
    labels = [str(v) for v in (config.get("variants") or {}).values()]
    return "-".join([*labels, trial_id]).replace("/", "_")


class TuneReporter:
    """The pipeline's reporter inside a trial: prints every step, reports held-out evals to
    Tune (``eval_every`` / ``eval_examples`` ask :class:`~raykd.algorithms.common.StageContext`
    for them) with ``global_step`` = steps of earlier stages + step."""

    def __init__(
        self, cfg, eval_every: int, eval_examples: int, state: dict | None = None, group="all"
    ):
        self.offsets = stage_offsets(cfg)
        self.group = group
        self.eval_every, self.eval_examples = eval_every, eval_examples
        state = state or {}
        self.last_step = int(state.get("global_step", 0))
        self.last = dict(state.get("metrics", {}))
        self.reports = int(state.get("reports", 0))

    def __call__(self, stage: str, step: int, total: int, metrics: dict) -> None:
        console_reporter(stage, step, total, metrics)
        if not any(k.startswith("heldout_") for k in metrics):
            return
        global_step = self.offsets.get(stage, 0) + step
        if global_step <= self.last_step:
            return  # reported before this trial was restarted
        row = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        row.update(stage=stage, step=step, global_step=global_step, group=self.group)
        self.last_step, self.last = global_step, row
        self.reports += 1
        self.report(row)

    def state(self) -> dict:
        return {"global_step": self.last_step, "metrics": self.last, "reports": self.reports}

    def report(self, row: dict) -> None:
        """``tune.report`` with a checkpoint holding :meth:`state` (a few bytes)."""
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, STATE_FILE).write_text(json.dumps(self.state()))
            tune.report(row, checkpoint=Checkpoint.from_directory(tmp))


def _restored_state() -> dict:
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return {}
    with ckpt.as_directory() as d:
        path = Path(d, STATE_FILE)
        return json.loads(path.read_text()) if path.exists() else {}


def _enter_working_dir(setup: dict) -> None:
    """Tune starts a trial in its own log directory; relative paths of the sweep (configs,
    data, run directories) mean the driver's working directory, or on another node the copy
    of it that ``ray job submit --working-dir`` unpacked there."""
    for cand in (setup.get("cwd"), os.environ.get("TUNE_ORIG_WORKING_DIR")):
        if cand and Path(cand).is_dir():
            os.chdir(cand)
            return


def final_metrics(results: dict) -> dict:
    """The distilled student's final evaluation, flattened for Tune."""
    from raykd.evaluate.metrics import retention

    models = results.get("models", {})
    student, teacher = models.get("student_after", {}), models.get("teacher", {})
    out = {"wall_seconds": float(results.get("wall_seconds") or 0.0)}
    for key in ("rouge_l", "parse_rate", "pass_at_1", "format_rate"):  # pass@1: code with tests
        if student.get(key) is not None:
            out[key] = float(student[key])
        if teacher.get(key) is not None:
            out[f"teacher_{key}"] = float(teacher[key])
    if "rouge_l" in out and "teacher_rouge_l" in out:
        out["retention"] = retention(out["rouge_l"], out["teacher_rouge_l"])
    kept = (results.get("compression") or {}).get("params_kept_percent")
    if kept is not None:
        out["params_kept_percent"] = float(kept)
    return out


def category_scores(cfg, results: dict) -> dict[str, float]:
    """Mean Rouge-L of the final student per Dolly ``category`` (empty for other tasks)."""
    per_example = (results.get("models", {}).get("student_after") or {}).get("per_example")
    if cfg.data.task != "dolly" or not per_example:
        return {}
    from raykd.data import load_task
    from raykd.models import load_tokenizer

    dc = cfg.data
    task = load_task(dc.task, load_tokenizer(cfg.teacher.model), path=dc.path,
                     max_length=dc.max_length, num_train=dc.num_train, num_eval=dc.num_eval,
                     eval_fraction=dc.eval_fraction,
                     seed=split_seed(cfg),
                     system_prompt=dc.system_prompt)  # fmt: skip
    by_cat: dict[str, list[float]] = {}
    for ex, scored in zip(task.eval, per_example):
        by_cat.setdefault(ex.meta.get("category") or "none", []).append(scored["rouge_l"])
    return {f"rouge_l/{c}": sum(v) / len(v) for c, v in sorted(by_cat.items())}


def run_trial(config: dict) -> None:
    """Tune's trainable: run (or resume) one trial's pipeline; see the module docstring."""
    from raykd.pipeline.run import run_pipeline

    setup = config["setup"]
    _enter_working_dir(setup)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(config, run_name_of(config, trial_id))
    pg = get_current_placement_group()
    placement = SlotPlacement(pg, slot_indices(cfg)) if pg is not None else None
    group = group_value(config, cfg)
    reporter = TuneReporter(
        cfg, setup["eval_every"], setup["eval_examples"], _restored_state(), group
    )
    results = run_pipeline(cfg, reporter=reporter, placement=placement)
    row = {
        **reporter.last,
        **final_metrics(results),
        **category_scores(cfg, results),
        "global_step": max(reporter.last_step, total_steps(cfg)),
        "pipeline_done": 1,
        "group": group,
        "run_dir": str(results["run_dir"]),
        "reserved_bundles": pg.bundle_count if pg is not None else 0,
    }
    reporter.last_step = row["global_step"]
    reporter.report(row)
