"""GKD and GRPO end to end through real roles: rollout workers sample, the teacher (GKD) or a
frozen reference (GRPO) scores, a DeepSpeed learner updates, weights sync back."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from raykd.algorithms.gkd import is_on_policy
from raykd.models import load_tokenizer
from raykd.pipeline.run import run_pipeline
from raykd.rewards import REWARDS

from .conftest import run_dir_of, tiny_config

pytestmark = pytest.mark.integration

FAST = ("pipeline.eval_teacher=false", "pipeline.eval_student_before=false")


def _rows(run_dir, stage):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage and "loss" in r]


def test_gkd_mixes_on_and_off_policy_steps_and_fits(ray_node, tiny_teacher, tmp_path):
    cfg = tiny_config(
        tmp_path,
        tiny_teacher,
        *FAST,
        "pipeline.train=[gkd]",
        "gkd.steps=6",
        "gkd.lmbda=0.5",
        "gkd.beta=0.5",
        "gkd.lr=1e-3",  # the bounded JSD oscillates at the fixture's lr of 1e-2
    )
    run_dir = run_dir_of(run_pipeline(cfg))
    rows = _rows(run_dir, "1-gkd")
    assert [r["step"] for r in rows] == list(range(1, 7))

    # the draws are the seeded ones (so a resumed run repeats them), and both kinds happen
    flags = [r["on_policy"] for r in rows]
    assert flags == [float(is_on_policy(cfg.run.seed, s, 0.5)) for s in range(6)]
    assert 0.0 < sum(flags) < len(flags), flags
    # on-policy responses are the student's samples (at most max_new_tokens of them)
    assert all(r["response_tokens"] <= 12 for r in rows if r["on_policy"])

    # every off-policy step trains on the same 4 examples: the JSD there falls
    off = [r["loss"] for r in rows if not r["on_policy"]]
    assert len(off) >= 2 and off[-1] < 0.8 * off[0], off
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert (run_dir / "models" / "final" / "model.safetensors").exists()


def test_gkd_off_policy_teacher_samples(ray_node, tiny_teacher, tmp_path):
    """lambda = 0 with off_policy=teacher: every step trains on fresh teacher samples."""
    cfg = tiny_config(
        tmp_path,
        tiny_teacher,
        *FAST,
        "pipeline.train=[gkd]",
        "gkd.steps=5",
        "gkd.lmbda=0.0",
        "gkd.off_policy=teacher",
        "gkd.beta=0.5",
        "gkd.lr=1e-3",
    )
    rows = _rows(run_dir_of(run_pipeline(cfg)), "1-gkd")
    assert [r["step"] for r in rows] == list(range(1, 6))
    assert all(r["on_policy"] == 0.0 for r in rows)
    # the responses are samples (<= rollout.max_new_tokens = 12), not the fixture's long
    # dataset responses (hundreds of byte tokens)
    assert all(0 < r["response_tokens"] <= 12 for r in rows), rows
    jsd = [r["loss"] for r in rows]
    assert all(math.isfinite(x) and x >= 0 for x in jsd)
    assert statistics.fmean(jsd[-2:]) < statistics.fmean(jsd[:2]), jsd


def _letters(examples, completions) -> list[float]:
    """Test-only batch reward: the share of ASCII letters in each completion."""
    return [sum(c.isascii() and c.isalpha() for c in text) / max(len(text), 1)
            for text in completions]  # fmt: skip


def test_grpo_raises_a_learnable_reward_with_kl_to_reference(
    ray_node, tiny_teacher, tmp_path, monkeypatch
):
    monkeypatch.setitem(REWARDS, "letters", _letters)
    steps = 8
    cfg = tiny_config(
        tmp_path,
        tiny_teacher,
        *FAST,
        "pipeline.train=[grpo]",
        f"grpo.steps={steps}",
        "grpo.prompts_per_step=2",
        "grpo.group_size=4",
        "grpo.rewards=[letters]",
        "grpo.beta=0.04",
        "grpo.kl_estimator=k3",
        "grpo.lr=1e-2",
        "grpo.ppo_epochs=2",
    )
    run_dir = run_dir_of(run_pipeline(cfg))
    rows = _rows(run_dir, "1-grpo")
    # pi_old is recomputed by the learner: the first epoch's ratio is exactly 1, nothing is
    # clipped; the second epoch reuses the batch after an update, and the clip acts
    assert all(r["first_epoch/clip_ratio/region_mean"] == 0.0 for r in rows), rows
    assert max(r["clip_ratio/region_mean"] for r in rows) > 0.0, rows
    assert [r["step"] for r in rows] == list(range(1, steps + 1))

    reward = [r["reward"] for r in rows]
    assert statistics.fmean(reward[-3:]) > statistics.fmean(reward[:3]) + 0.05, reward
    assert all(0 < r["response_length"] <= 12 for r in rows)
    assert all(r["reward_std"] >= 0 for r in rows)

    # KL to the frozen start model (of the policy as sampled): finite, ~0 before the first
    # update, positive after
    kl = [r["first_epoch/kl"] for r in rows]
    assert all(math.isfinite(x) and x >= 0 for x in kl), kl
    assert kl[0] < 1e-4 and max(kl[1:]) > 1e-4, kl
    assert (run_dir / "models" / "final" / "model.safetensors").exists()


def test_seqkd_trains_on_teacher_samples_and_reuses_them(ray_node, tiny_teacher, tmp_path):
    """Sequence-level KD: the teacher samples N responses per prompt once; the student's
    cross-entropy on those samples falls; a rerun of the stage reads the same samples."""
    cfg = tiny_config(
        tmp_path,
        tiny_teacher,
        "pipeline.train=[seqkd]",
        "pipeline.eval_teacher=false",
        "seqkd.steps=6",
        "seqkd.samples_per_prompt=2",
        "seqkd.teacher_instruction='Think step by step.'",
        "learner.lr=3e-3",
    )
    run_dir = run_dir_of(run_pipeline(cfg))
    samples = (run_dir / "data" / "1-seqkd-teacher_samples.jsonl").read_text().splitlines()
    assert len(samples) == 8  # 4 prompts x 2 samples
    first = json.loads(samples[0])
    assert first["uid"].endswith("#t0") and len(first["response_ids"]) > 0
    # SCoTD: the teacher was asked for its reasoning; the student trains on the plain prompt
    tok = load_tokenizer(tiny_teacher)
    teacher_prompt = tok.decode(first["teacher_prompt_ids"])
    student_prompt = tok.decode(first["prompt_ids"])
    assert "Think step by step." in teacher_prompt and "Think step by step." not in student_prompt
    assert teacher_prompt.replace("\n\nThink step by step.", "") == student_prompt
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ce = [r["ce"] for r in rows if r["stage"] == "1-seqkd" and "ce" in r]
    assert len(ce) == 6 and ce[-1] < 0.8 * ce[0]
