"""Ray Tune sweeps of whole pipelines on the local node: ASHA stops the bad trial, a sweep
whose driver was killed resumes with Tuner.restore, and the summary holds the real numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raykd.tune import load_sweep, run_sweep

from .conftest import FIXTURES, REPO

pytestmark = pytest.mark.integration


def write_sweep(
    tmp_path: Path, teacher: str, sweep: dict, temperature: float = 1.0, algorithm="word_kd"
) -> Path:
    """A tiny run config (2-layer student of the 4-layer tiny teacher, one stage of 6 steps,
    Dolly EN fixture) and a sweep file over it."""
    data = {"task": "dolly", "path": str(FIXTURES / "dolly_en.jsonl"), "max_length": 512,
            "num_train": 4, "eval_fraction": 0.25, "num_eval": 2}  # fmt: skip
    pipeline = {"checkpoint_every": 2, "eval_teacher": False, "eval_student_before": False,
                "stages": [{"name": f"1-{algorithm}", "algorithm": algorithm}]}  # fmt: skip
    run = {
        "run": {"output_dir": str(tmp_path / "runs"), "name": "unused"},
        "teacher": {"model": teacher, "top_k": 16, "batch_size": 4},
        "student": {"init": "from_teacher", "rule": "every_other", "keep": 2},
        "data": data,
        "learner": {"micro_batch_size": 4, "lr": 0.01},
        "rollout": {"num_workers": 1, "max_new_tokens": 12},
        "eval": {"max_new_tokens": 8, "batch_size": 2},
        "pipeline": pipeline,
        # a temperature of its own: the session's target cache holds no targets for it yet
        "word_kd": {"steps": 6, "temperature": temperature},
        "sft": {"steps": 6},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    spec = {"configs": ["run.yaml"], "output_dir": str(tmp_path / "sweeps"), "eval_every": 2,
            "eval_examples": 2, "max_concurrent_trials": 1, **sweep}  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"sweep": spec}, sort_keys=False))
    return path


def target_files(temperature: float) -> list[Path]:
    """The teacher-target cache entries of this session's cache at ``temperature``."""
    root = Path(os.environ["RAYKD_CACHE"]) / "targets"
    return [f for d in root.glob(f"*-k16-t{temperature:g}") for f in d.glob("*.pt")]


def metric_rows(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_asha_stops_the_bad_trial_and_the_summary_holds_both(ray_node, tiny_teacher, tmp_path):
    sweep = {"name": "asha", "scheduler": {"type": "asha", "grace_period": 2,
             "reduction_factor": 2}, "space": {"learner.lr": {"grid": [0.01, 1.0e-5]}}}  # fmt: skip
    plan = load_sweep(write_sweep(tmp_path, tiny_teacher, sweep, temperature=1.5))
    assert plan.checked == 2 and plan.max_steps == 6
    # driver, learner, rollout, teacher: the node's 2 CPUs exactly, so a role actor outside
    # the trial's reservation could never be scheduled (the trial would hang, not pass)
    assert plan.bundles[0] == [{"CPU": 0.5}] * 4
    t0 = time.time()
    summary = run_sweep(plan)
    print(f"asha sweep: {time.time() - t0:.0f}s")

    assert summary["counts"] == {"completed": 1, "stopped": 1}
    good, bad = summary["trials"]  # grid order: lr 0.01, then 1e-5
    assert good["params"] == {"learner.lr": 0.01} and bad["params"] == {"learner.lr": 1e-5}
    # the good trial trained all 6 steps, evaluated every 2, and finished its pipeline
    assert good["status"] == "completed" and good["global_step"] == 6
    assert [s for s, _ in good["history"]] == [2, 4, 6]
    assert good["metric"] == good["history"][-1][1]
    assert 0.0 <= good["rank"] <= 100.0 and good["final"]["rouge_l"] == good["rank"]
    # ASHA stopped the other at its first rung (step 2): its held-out CE was worse there
    assert bad["status"] == "stopped" and [s for s, _ in bad["history"]] == [2]
    assert bad["history"][0][1] > good["history"][0][1]
    assert bad["rank"] is None and bad["global_step"] == 2
    # every trial is a normal raykd run directory; the stopped one never got to its report
    good_dir, bad_dir = Path(good["run_dir"]), Path(bad["run_dir"])
    assert json.loads((good_dir / "report.json").read_text())["models"]["student_after"]
    assert not (bad_dir / "report.json").exists()
    rows = metric_rows(bad_dir)
    assert {r["step"] for r in rows if "loss" in r} <= {1, 2, 3}
    assert [r["heldout_ce"] for r in rows if "heldout_ce" in r] == [bad["metric"]]
    # the trial ran in its own reservation: driver + learner, rollout and teacher bundles
    assert good["final"]["reserved_bundles"] == 4
    assert json.loads((good_dir / "stages" / "1-word_kd.json").read_text())["steps"] == 6
    # the teacher targets were scored once, by the first trial; the second read them
    assert len(target_files(1.5)) == 4
    targets = [{k: r[k] for k in ("cached", "scored")} for t in (good_dir, bad_dir)
               for r in metric_rows(t) if "teacher_targets_scored" in r]  # fmt: skip
    assert targets == [{"cached": 0, "scored": 4}, {"cached": 4, "scored": 0}]

    # the summary: best per group, the files, and their contents
    assert summary["best"] == {"dolly": {"trial_id": good["trial_id"], "by": "rank",
                               "value": good["rank"], "params": {"learner.lr": 0.01},
                               "run_dir": good["run_dir"]}}  # fmt: skip
    on_disk = json.loads(Path(summary["files"]["json"]).read_text())
    assert on_disk["trials"] == json.loads(json.dumps(summary["trials"]))
    md = Path(summary["files"]["md"]).read_text()
    assert f"| dolly | {good['trial_id']} | rouge_l | {good['rank']:.4g} |" in md
    assert f"| {bad['trial_id']} | dolly | 1e-05 | stopped | {bad['metric']:.4g} | – |" in md
    assert Path(summary["files"]["png"]).stat().st_size > 5000


DRIVER = """
import os, signal, sys
from ray import tune
from raykd.tune import load_sweep, run_sweep

class DieMidTrial(tune.Callback):
    \"\"\"SIGKILLs this driver when the second trial reports step 4 (that trial is then
    blocked in tune.report: its raykd checkpoint of step 2 is on disk, step 4's is not).\"\"\"

    def __init__(self):
        self.pid = os.getpid()  # a restored copy in another process does nothing

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if os.getpid() == self.pid and trial.trial_id.endswith("_00001"):
            if result.get("global_step") == 4:
                os.kill(self.pid, signal.SIGKILL)

run_sweep(load_sweep(sys.argv[1]), callbacks=[DieMidTrial()])
"""


def test_sweep_resumes_after_the_driver_is_killed(ray_node, tiny_teacher, tmp_path):
    import ray

    sweep = {"name": "resume", "scheduler": {"type": "fifo"},
             "space": {"learner.lr": {"grid": [0.01, 0.02]}}}  # fmt: skip
    path = write_sweep(tmp_path, tiny_teacher, sweep, algorithm="sft")  # no teacher: faster
    trials = tmp_path / "sweeps" / "resume" / "trials"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # fmt: skip
    (tmp_path / "driver.py").write_text(DRIVER)
    with (tmp_path / "driver.log").open("w") as log:
        proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(path)],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=400)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-3000:]
    done = [p.parent for p in trials.glob("*/report.json")]
    assert len(done) == 1  # the first trial finished before the driver died
    (second,) = [p for p in trials.iterdir() if p not in done]
    first_report = (done[0] / "report.json").stat().st_mtime_ns

    t0 = time.time()
    summary = run_sweep(load_sweep(path))  # the same command again: Tuner.restore
    print(f"restored sweep: {time.time() - t0:.0f}s")
    assert summary["counts"] == {"completed": 2}
    assert {Path(t["run_dir"]) for t in summary["trials"]} == {done[0], second}
    assert (done[0] / "report.json").stat().st_mtime_ns == first_report  # not run again
    for t in summary["trials"]:
        # one point per step in Tune's history, over both lives of the driver
        assert [s for s, _ in t["history"]] == [2, 4, 6] and t["global_step"] == 6
        assert t["final"]["reserved_bundles"] == 3  # driver, learner, rollout
    # the interrupted trial's run directory resumed from its raykd checkpoint (step 2):
    # steps 1-2 were trained once, 3-4 twice (before and after the driver died)
    trained = [r["step"] for r in metric_rows(second) if "loss" in r]
    assert trained == [1, 2, 3, 4, 3, 4, 5, 6]
    assert (second / "report.json").exists()
