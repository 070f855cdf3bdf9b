"""The driver of an embedded node, stopped mid-stage: Ctrl-C (SIGINT) exits with one line and
releases everything; SIGKILL (no chance to clean up) leaves no Ray process behind either: the
GCS, raylet, agents and workers of its node are gone within seconds. In both cases the last
checkpoint stays whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from omegaconf import OmegaConf

from raykd.roles.reaper import TOKEN_VAR, descendants

from .conftest import tiny_config

pytestmark = pytest.mark.integration

ARGS = ("pipeline.train=[sft]", "sft.steps=400", "pipeline.checkpoint_every=2",
        "pipeline.eval_teacher=false", "pipeline.eval_student_before=false",
        "data.num_train=6", "learner.micro_batch_size=2", "ray.num_cpus=2")  # fmt: skip


def node_pids(driver: int) -> dict[int, tuple[str, float]]:
    """Live processes (pid -> (program or title, start time)) of the node that ``driver``
    started: its descendants and those whose environment carries a node token of it."""
    mine = set(descendants(driver, set()))
    out = {}
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid not in mine and not p.environ().get(TOKEN_VAR, "").startswith(f"{driver}-"):
                continue
            cmd = p.cmdline()
            out[p.pid] = (cmd[0].split(" ")[0].rsplit("/", 1)[-1] if cmd else p.name(),
                          p.create_time())  # fmt: skip
        except (psutil.Error, OSError):
            continue
    return out


def still_alive(procs: dict[int, tuple[str, float]]) -> dict[int, str]:
    """Those of ``procs`` still running (the same process: same start time; not a zombie)."""
    out = {}
    for pid, (title, started) in procs.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                out[pid] = title
        except psutil.Error:
            continue
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_stopped_driver_leaves_no_ray_processes(tiny_teacher, tmp_path, sig):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(OmegaConf.to_yaml(tiny_config(tmp_path, tiny_teacher, *ARGS)))
    state = tmp_path / "t" / "checkpoints" / "1-sft" / "raykd_state.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", TOKEN_VAR)}
    cmd = [sys.executable, "-m", "raykd.cli", "run", str(cfg_path)]
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        # its own session, like a terminal's job: Ctrl-C reaches its whole process group
        child = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not state.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert child.poll() is None, (tmp_path / "err.log").read_text()[-3000:]
        before = node_pids(child.pid)
        titles = " ".join(t for t, _ in before.values())
        # the node's own processes (the learner may be busy in a call): gcs, raylet, agents
        assert "gcs_server" in titles and "raylet" in titles and "Agent" in titles, before
        if sig == signal.SIGINT:
            os.killpg(child.pid, sig)  # what Ctrl-C in the terminal does
        else:
            child.send_signal(sig)
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    err = (tmp_path / "err.log").read_text()
    if sig == signal.SIGINT:
        assert child.returncode == 130, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        ours = [line for line in err.splitlines() if line.startswith("raykd: ")]
        assert ours == [
            f"raykd: interrupted; resume from the last checkpoint with: raykd run {cfg_path}"
        ], err[-3000:]
    else:
        assert child.returncode == -signal.SIGKILL
    deadline = time.time() + 20
    while still_alive(before) and time.time() < deadline:
        time.sleep(0.25)
    assert still_alive(before) == {}, (still_alive(before), before)
    # nothing half-written: the last checkpoint reads whole, the stage never finished
    assert json.loads(state.read_text())["step"] % 2 == 0
    assert not (tmp_path / "t" / "stages" / "1-sft.json").exists()
