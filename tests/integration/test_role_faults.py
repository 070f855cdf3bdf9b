"""Faults during a run, on a real local Ray node, by SIGKILL of real actor processes: a dead
sampler or teacher scorer is replaced (weights re-synced) and the step retried, ending at the
unbroken run's weights; a dead learner rank stops the run with one line naming it and the
command that resumes, and that command ends at the unbroken run's weights."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from raykd.pipeline.run import run_pipeline
from raykd.roles.reaper import TOKEN_VAR, marked

from .conftest import run_dir_of, tiny_config

pytestmark = pytest.mark.integration


def actor_pids(prefix: str) -> list[int]:
    """Pids of this session's Ray workers whose process title starts with ``ray::<prefix>``
    (workers of this node carry its token; other nodes on the machine do not)."""
    out = []
    for pid in marked(os.environ[TOKEN_VAR], {os.getpid()}):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if title.startswith(f"ray::{prefix}"):
            out.append(pid)
    return out


def kill_when_logged(
    metrics: Path, kills: dict[int, str], log: list, first_only: bool = False
) -> threading.Thread:
    """A thread that SIGKILLs the actors titled ``kills[step]`` (``first_only``: one of them)
    once ``step`` is logged; ``log`` gets ``(step, pids)``."""

    def watch():
        deadline = time.time() + 600
        todo = dict(kills)
        while todo and time.time() < deadline:
            rows = metrics.read_text().splitlines() if metrics.exists() else []
            done = {json.loads(r).get("step") for r in rows if r.strip()}
            for step in [s for s in todo if s in done]:
                pids = sorted(actor_pids(todo.pop(step)))[: 1 if first_only else None]
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                log.append((step, pids))
            time.sleep(0.02)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


ONPOLICY = (
    "pipeline.train=[reverse_kl]",
    "pipeline.eval_teacher=false",
    "reverse_kl.steps=5",
    "reverse_kl.prompts_per_step=4",
    "reverse_kl.lm_coef=0.0",
    "learner.lr=1e-3",
    "learner.zero_stage=0",
    "rollout.max_new_tokens=8",
    "pipeline.eval_student_before=false",
    "eval.sample_seeds=[]",
)


def test_killed_sampler_and_scorer_are_replaced_and_the_run_ends_unbroken(
    ray_node, tiny_teacher, tmp_path, caplog
):
    """The rollout worker is SIGKILLed after step 1 (it then holds synced weights, not the
    stage's initial ones) and the teacher scorer after step 3: each is rebuilt in its bundle,
    the sampler gets the learners' weights again, the step's calls are resent; the final
    weights equal an unbroken run's, and the log and metrics name each replacement."""
    unbroken = run_dir_of(run_pipeline(tiny_config(tmp_path / "unbroken", tiny_teacher, *ONPOLICY)))
    want = load_file(unbroken / "models" / "final" / "model.safetensors")

    run_dir = tmp_path / "faulty" / "t"
    killed: list = []
    watcher = kill_when_logged(
        run_dir / "metrics.jsonl", {1: "HFRolloutWorker", 3: "HFTeacherScorer"}, killed
    )
    with caplog.at_level(logging.WARNING, logger="raykd.roles.group"):
        run_pipeline(tiny_config(tmp_path / "faulty", tiny_teacher, *ONPOLICY))
    watcher.join(timeout=5)
    assert [(s, len(p)) for s, p in killed] == [(1, 1), (3, 1)], killed

    got = load_file(run_dir / "models" / "final" / "model.safetensors")
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-6, msg=name)
    warnings = [r.getMessage() for r in caplog.records if "died" in r.getMessage()]
    assert any(m.startswith("raykd: rollout actor 0 died (") and "attempt 1 of 3" in m
               for m in warnings), warnings  # fmt: skip
    assert any(m.startswith("raykd: teacher actor 0 died (") and "attempt 1 of 3" in m
               for m in warnings), warnings  # fmt: skip
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "1-reverse_kl"] == [1, 2, 3, 4, 5]
    restarts = {k: v for r in rows for k, v in r.items() if k.startswith("restarts/")}
    assert restarts == {"restarts/rollout": 1.0, "restarts/teacher": 1.0}, restarts
    # each replacement is counted in the one step whose calls it retried
    assert sum("restarts/rollout" in r for r in rows) == 1
    assert sum("restarts/teacher" in r for r in rows) == 1


SFT = ("pipeline.train=[sft]", "sft.steps=8", "pipeline.checkpoint_every=2",
       "pipeline.eval_teacher=false", "data.num_train=6", "learner.micro_batch_size=1",
       "learner.num_ranks=2", "learner.zero_stage=1", "learner.lr=1e-3",
       "learner.cpus_per_rank=0.5", "pipeline.eval_student_before=false",
       "eval.sample_seeds=[]")  # fmt: skip


def test_killed_learner_rank_stops_with_one_line_and_the_command_resumes(
    ray_node, tiny_teacher, tmp_path
):
    """``raykd run`` whose learner rank is SIGKILLed after the step-2 checkpoint exits 1 with
    one line (no traceback) naming the rank and the command; that command resumes from the
    checkpoint (data order and RNG restored) and ends at the unbroken run's weights."""
    unbroken = run_dir_of(run_pipeline(tiny_config(tmp_path / "unbroken", tiny_teacher, *SFT)))
    want = load_file(unbroken / "models" / "final" / "model.safetensors")

    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(OmegaConf.to_yaml(tiny_config(tmp_path / "killed", tiny_teacher, *SFT)))
    run_dir = tmp_path / "killed" / "t"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    killed: list = []
    watcher = kill_when_logged(run_dir / "metrics.jsonl", {3: "Learner"}, killed, True)
    proc = subprocess.run([sys.executable, "-m", "raykd.cli", "run", str(cfg_path)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    watcher.join(timeout=5)
    assert killed and len(killed[0][1]) == 1, killed  # one of the two ranks
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    (tmp_path / "stderr.log").write_text(err)
    # one line of raykd's (Ray's own worker logs stream in around it)
    ours = [line for line in err.splitlines() if line.startswith("raykd: ")]
    assert len(ours) == 1, ours
    assert re.fullmatch(
        r"raykd: learner rank [01] died mid-stage \(ActorDiedError: its process was killed, ran out of memory or lost its node\); "
        rf"resume from the last checkpoint with: raykd run {re.escape(str(cfg_path))}",
        ours[0],
    ), ours[0]
    ckpt_step = json.loads((run_dir / "checkpoints" / "1-sft" / "raykd_state.json").read_text())
    assert ckpt_step["step"] in (2, 4), ckpt_step  # the kill landed in step 4 (or 5)

    resumed = run_dir_of(run_pipeline(tiny_config(tmp_path / "killed", tiny_teacher, *SFT)))
    assert resumed == run_dir
    got = load_file(run_dir / "models" / "final" / "model.safetensors")
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-6, msg=name)


class Fragile:
    """Dies (SIGKILL of its own process) on a call while the shared countdown file says so."""

    def __init__(self, countdown: str):
        self.countdown = Path(countdown)

    def work(self, x):
        left = int(self.countdown.read_text())
        if left > 0:
            self.countdown.write_text(str(left - 1))
            os.kill(os.getpid(), signal.SIGKILL)
        return x * 10


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _fragile(tmp_path, deaths: int, max_restarts: int):
    from raykd.roles.group import RoleGroup

    countdown = tmp_path / "countdown"
    countdown.write_text(str(deaths))
    return RoleGroup(Fragile, 2, num_cpus=0.1, make_args=lambda r: ((str(countdown),), {}),
                     name="fragile", max_restarts=max_restarts)  # fmt: skip


def test_replacement_resends_in_order_and_is_bounded(ray_node, tmp_path, caplog):
    """One death: the actor is rebuilt, ``restore`` runs for its rank, every call of the wait
    on that slot is resent, results keep their order. Deaths past ``max_restarts`` raise
    :class:`RoleActorDied` naming the role, the actor and the limit."""
    from raykd.roles.group import RoleActorDied

    with _fragile(tmp_path, 1, 2) as group:
        restored = []
        group.restore = lambda g, rank: restored.append(rank)
        with caplog.at_level(logging.WARNING, logger="raykd.roles.group"):
            assert group.map("work", list(range(6))) == [0, 10, 20, 30, 40, 50]
        assert group.restarts == 1 and len(restored) == 1
        assert [r.getMessage() for r in caplog.records] == [
            f"raykd: fragile actor {restored[0]} died (ActorDiedError); replacing it, attempt 1 "
            "of 2, and resending its calls"
        ]
    with _fragile(tmp_path, 100, 2) as group:
        with pytest.raises(RoleActorDied) as err:
            group.map("work", [1])
        assert str(err.value) == (
            "fragile actor 0 died mid-stage (ActorDiedError: its process was killed, ran out of "
            "memory or lost its node; already replaced 2 time(s), the limit (max_restarts=2))"
        )
        assert group.restarts == 2
