"""A run killed mid-stage resumes from its last atomic checkpoint and ends where an unbroken
run ends (same weights), with nothing already written lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import ray
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from raykd.pipeline.run import run_pipeline
from raykd.rundir import RunDir

from .conftest import run_dir_of, tiny_config

pytestmark = pytest.mark.integration


def test_killed_stage_resumes_from_checkpoint_to_the_same_weights(ray_node, tiny_teacher, tmp_path):
    args = (
        "pipeline.train=[sft]",
        "sft.steps=4",
        "pipeline.checkpoint_every=2",
        "pipeline.eval_teacher=false",
        "data.num_train=6",
        "learner.micro_batch_size=2",
    )
    run_dir = run_dir_of(run_pipeline(tiny_config(tmp_path, tiny_teacher, *args)))
    unbroken = load_file(run_dir / "models" / "final" / "model.safetensors")
    ckpt = run_dir / "checkpoints" / "1-sft"
    assert json.loads((ckpt / "raykd_state.json").read_text()) == {"step": 2}

    # Put the run directory back into the state a kill during step 3 leaves behind: the
    # step-2 checkpoint and everything before the stage, but no stage result.
    for p in ("models/1-sft", "models/final", "eval/student_after.json", "stages/1-sft.json"):
        target = run_dir / p
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    before = (run_dir / "eval" / "student_before.json").read_text()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    keep = [x for x in lines if json.loads(x)["step"] <= 2]
    (run_dir / "metrics.jsonl").write_text("\n".join(keep) + "\n")

    resumed_dir = run_dir_of(run_pipeline(tiny_config(tmp_path, tiny_teacher, *args)))
    assert resumed_dir == run_dir
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # only steps 3 and 4 were trained again
    # earlier results were kept, not recomputed
    assert (run_dir / "eval" / "student_before.json").read_text() == before
    resumed = load_file(run_dir / "models" / "final" / "model.safetensors")
    for name, w in unbroken.items():
        torch.testing.assert_close(resumed[name], w, rtol=1e-5, atol=1e-6, msg=name)


def test_sigkilled_run_resumes_to_the_same_weights(ray_node, tiny_teacher, tmp_path):
    """A real ``raykd run`` process, SIGKILLed mid-stage (no chance to clean up), then the
    same command again: it resumes from the last checkpoint and ends at the unbroken run's
    weights; the log keeps every row and reads one row per step."""
    args = ("pipeline.train=[sft]", "sft.steps=16", "pipeline.checkpoint_every=2",
            "pipeline.eval_teacher=false", "data.num_train=6", "learner.micro_batch_size=2",
            "learner.lr=1e-3")  # fmt: skip
    unbroken_dir = run_dir_of(run_pipeline(tiny_config(tmp_path / "unbroken", tiny_teacher, *args)))
    unbroken = load_file(unbroken_dir / "models" / "final" / "model.safetensors")

    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(OmegaConf.to_yaml(tiny_config(tmp_path / "killed", tiny_teacher, *args)))
    run_dir = tmp_path / "killed" / "t"
    state = run_dir / "checkpoints" / "1-sft" / "raykd_state.json"
    # the child joins this session's Ray node; its actors die with it (their owner)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "raykd.cli", "run", str(cfg_path)]
    with open(tmp_path / "child.log", "w") as log:
        child = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not state.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert child.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
        assert state.exists(), "no checkpoint within 300 s"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 2 <= killed_at < 16 and not (run_dir / "stages" / "1-sft.json").exists()
    logged_before = len((run_dir / "metrics.jsonl").read_text().splitlines())

    resumed_dir = run_dir_of(run_pipeline(tiny_config(tmp_path / "killed", tiny_teacher, *args)))
    assert resumed_dir == run_dir
    resumed = load_file(run_dir / "models" / "final" / "model.safetensors")
    for name, w in unbroken.items():
        torch.testing.assert_close(resumed[name], w, rtol=1e-5, atol=1e-6, msg=name)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = RunDir(run_dir).read_metrics("1-sft")
    assert [r["step"] for r in rows] == list(range(1, 17))
    # nothing already written was lost: the killed run's rows are still in the log, and the
    # resumed run logged only the steps after its checkpoint
    assert len(lines) >= logged_before + (16 - killed_at)
    # It really resumed (a rerun from scratch reaches the same deterministic weights): the
    # resumed process's rows start right after the checkpoint's step, not at step 1.
    resumed_steps = [row["step"] for row in map(json.loads, lines[logged_before:])
                     if row.get("stage") == "1-sft"]  # fmt: skip
    assert resumed_steps == list(range(killed_at + 1, 17)), (killed_at, resumed_steps)
