"""On-policy reverse KL (MiniLLM policy gradient) end to end through real roles: rollout
workers sample, the teacher scores, two DeepSpeed ranks update, weights sync back."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from raykd.pipeline.run import run_pipeline

from .conftest import run_dir_of, tiny_config

pytestmark = pytest.mark.integration


def test_reverse_kl_reduces_kl_on_overfit_prompts(ray_node, tiny_teacher, tmp_path):
    cfg = tiny_config(
        tmp_path,
        tiny_teacher,
        "pipeline.train=[reverse_kl]",
        "pipeline.eval_teacher=false",
        "reverse_kl.steps=8",
        "reverse_kl.prompts_per_step=4",
        "reverse_kl.lm_coef=0.0",
        "reverse_kl.whiten=true",
        "learner.lr=1e-3",
        "learner.num_ranks=2",
        "learner.micro_batch_size=2",
        "learner.zero_stage=1",
        "rollout.max_new_tokens=16",
    )
    run_dir = run_dir_of(run_pipeline(cfg))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["stage"] == "1-reverse_kl"]
    assert [r["step"] for r in rows] == list(range(1, 9))
    kl = [r["reverse_kl"] for r in rows]
    # the per-sequence reverse-KL estimate sum_t (log q - log p_T) of the student's own
    # samples falls as the policy gradient pulls the student onto the teacher
    assert statistics.fmean(kl[-3:]) < 0.7 * statistics.fmean(kl[:3]), kl
    # the sampler's log-probs equal the learner's (weights were synced each step): checked by
    # the learners' recomputation on the first step, after which the stage trusts them
    assert rows[0]["old_logprobs_recomputed"] == 1.0 and rows[0]["sampler_mismatch"] < 1e-4
    assert [r["old_logprobs_recomputed"] for r in rows[1:]] == [0.0] * 7
    assert (run_dir / "models" / "final" / "model.safetensors").exists()
    # every step records where its time went (seconds, finite, within the step); teacher
    # scoring and the old log-probs run side by side inside the scoring phase
    phases = ("sampling", "scoring", "learner", "weight_sync")
    for r in rows:
        times = {k: r[f"time/{k}"] for k in (*phases, "teacher_scoring", "old_logprobs",
                                              "ray_overhead", "controller", "step")}  # fmt: skip
        assert all(math.isfinite(v) and v >= 0 for v in times.values()), times
        assert sum(times[k] for k in phases) <= times["step"] + 1e-6, times
        assert times["ray_overhead"] <= sum(times[k] for k in phases) + 1e-6, times
        assert max(times["teacher_scoring"], times["old_logprobs"]) <= times["scoring"] + 1e-6
    assert rows[-1]["time/old_logprobs"] == 0.0  # not recomputed


def test_minillm_in_full_mixed_sampling_and_single_step(ray_node, tiny_teacher, tmp_path):
    """Teacher-mixed sampling (rollout workers hold the teacher) + the single-step
    full-vocabulary reverse KL (teacher colocated in the DeepSpeed learner) + LM term."""
    cfg = tiny_config(
        tmp_path,
        tiny_teacher,
        "pipeline.train=[reverse_kl]",
        "pipeline.eval_teacher=false",
        "reverse_kl.steps=6",
        "reverse_kl.prompts_per_step=4",
        "reverse_kl.mix_alpha=0.3",
        "reverse_kl.single_step_coef=1.0",
        "reverse_kl.lm_coef=0.1",
        "learner.lr=1e-3",
        "rollout.max_new_tokens=16",
    )
    run_dir = run_dir_of(run_pipeline(cfg))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["stage"] == "1-reverse_kl"]
    assert [r["step"] for r in rows] == list(range(1, 7))
    # w_t = q/p~ with p~ >= (1 - a) q: inside (0, 1/(1 - a)], and not all 1 (mixing happened)
    weights = [r["importance_weight"] for r in rows]
    assert all(0.0 < w <= 1 / 0.7 + 1e-6 for w in weights), weights
    assert any(abs(w - 1.0) > 1e-3 for w in weights), weights
    # the mixture sampler's log q(y_t) equals the learner's (cached decoding is exact)
    assert max(r["sampler_mismatch"] for r in rows if "sampler_mismatch" in r) < 1e-4
    # the exact full-vocabulary reverse KL at the sampled positions falls
    single = [r["single_step"] for r in rows]
    assert statistics.fmean(single[-2:]) < 0.7 * statistics.fmean(single[:2]), single
    assert all(r["lm"] > 0 for r in rows)
