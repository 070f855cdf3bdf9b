"""GRPO's code-reward plumbing without roles: the required sandbox layers refuse training with
the probe's reason, the execution reward inherits them, the dense teacher term, and the role
slots a Tune trial reserves for GRPO with teacher rewards."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from raykd.algorithms.grpo import check_sandbox, mean_response_logprob, reward_function
from raykd.config import load_config
from raykd.config.stages import stage_params
from raykd.pipeline.resources import slot_bundles, stage_slots
from raykd.sandbox import SandboxUnavailable, core

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _grpo(*overrides):
    cfg = load_config(None, ["pipeline.train=[grpo]", *overrides])
    stage = OmegaConf.to_container(cfg.pipeline.stages, resolve=True)[0]
    return cfg, stage, stage_params(cfg, stage)


def test_missing_required_layer_refuses_with_the_probes_reason(monkeypatch):
    info = {**core.probe(), "seccomp": False}
    info["errors"] = {**info.get("errors", {}), "seccomp": "prctl(PR_SET_SECCOMP): EINVAL"}
    monkeypatch.setattr(core, "probe", lambda python=None, refresh=False: dict(info))
    _, _, gc = _grpo("grpo.rewards=[execution]", "grpo.sandbox_require=[seccomp,landlock]")
    with pytest.raises(SandboxUnavailable, match="seccomp.*EINVAL"):
        check_sandbox(gc)
    _, _, plain = _grpo("grpo.rewards=[format]")
    assert check_sandbox(plain) is None  # no code runs: nothing to check


def test_execution_reward_inherits_the_required_layers():
    _, _, gc = _grpo("grpo.rewards=[execution,format]", "grpo.sandbox_require=[seccomp]",
                     "grpo.reward_kwargs={execution: {mode: all_or_nothing}}")  # fmt: skip
    fn = reward_function(gc)
    params = fn.fns[0].keywords
    assert params == {"mode": "all_or_nothing", "require": ["seccomp"]}
    if core.probe().get("seccomp"):
        assert "seccomp" in check_sandbox(gc)


def test_mean_response_logprob_is_the_mean_over_response_tokens():
    lp = torch.tensor([[0.0, -1.0, -3.0, 0.0], [0.0, -2.0, 0.0, 0.0], [0.0] * 4])
    mask = torch.tensor([[0.0, 1, 1, 0], [0.0, 1, 0, 0], [0.0] * 4])
    assert mean_response_logprob(lp, mask).tolist() == [-2.0, -2.0, 0.0]


def test_grpo_with_teacher_rewards_reserves_the_teacher_and_reference_slots():
    cfg, stage, _ = _grpo()
    assert stage_slots(cfg, stage) == {"learner", "rollout"}
    cfg, stage, _ = _grpo("grpo.teacher_logprob_weight=0.1")
    assert stage_slots(cfg, stage) == {"learner", "rollout", "teacher"}
    cfg, stage, _ = _grpo("grpo.teacher_logprob_weight=0.1", "grpo.beta=0.04",
                          "teacher.num_workers=2")  # fmt: skip
    assert stage_slots(cfg, stage) == {"learner", "rollout", "teacher", "reference"}
    bundles = slot_bundles(cfg)
    assert len(bundles["reference"]) == 2 == len(bundles["teacher"])
    cfg, stage, _ = _grpo("grpo.beta=0.04")
    assert stage_slots(cfg, stage) == {"learner", "rollout", "teacher"}  # reference only
