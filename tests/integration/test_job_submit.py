"""`ray job submit` to a real local head runs the pipeline through jobs/run.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from raykd.roles.runtime import free_port

from .conftest import REPO, tiny_config

pytestmark = pytest.mark.integration


def test_job_submit_runs_the_pipeline_on_a_local_head(tiny_teacher, tmp_path):
    ray_bin = Path(sys.executable).with_name("ray")
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    cfg = tiny_config(tmp_path / "runs", tiny_teacher, "pipeline.train=[sft]", "sft.steps=2",
                      "pipeline.eval_teacher=false", "run.name=job")  # fmt: skip
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(OmegaConf.to_yaml(cfg))
    port, dash = free_port(), free_port()
    temp_dir = Path("/tmp") / f"raykd_job_{port}"  # short: unix socket paths are limited
    # --block keeps the head in one process group of its own, which is all we stop afterwards
    # (`ray stop` would stop every Ray node on the machine).
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}",
         f"--dashboard-port={dash}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={temp_dir}",
         # every port of its own: another Ray node on this machine holds the defaults
         f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_dashboard(dash, head)
        submit = [str(ray_bin), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                  "--working-dir", str(REPO), "--", sys.executable, "jobs/run.py", str(cfg_path)]  # fmt: skip
        # The entrypoint is a shell command on the head: name this interpreter, since `python`
        # on the head's PATH need not be the environment raykd is installed in (CI's is not).
        for _ in range(15):  # the job agent can come up a little after the dashboard
            out = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in out.stderr:
                break
            time.sleep(2.0)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "succeeded" in out.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
    run_dir = tmp_path / "runs" / "job"
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (run_dir / "report.md").exists() and (run_dir / "models" / "final").is_dir()


def _wait_for_dashboard(port: int, head: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray head exited with {head.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs/", timeout=2):
                return
        except OSError:
            time.sleep(1.0)
    raise TimeoutError(f"dashboard on port {port} did not come up in {timeout}s")
