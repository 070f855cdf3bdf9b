"""On-policy reverse KL (MiniLLM policy gradient) end to end through real roles: rollout
workers sample, the teacher scores, two DeepSpeed ranks update, weights sync back."""

from __future__ import annotations

import json
import statistics

import pytest

from raykd.pipeline.run import run_pipeline

from .conftest import tiny_config

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
    run_dir = run_pipeline(cfg)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["stage"] == "1-reverse_kl"]
    assert [r["step"] for r in rows] == list(range(1, 9))
    kl = [r["reverse_kl"] for r in rows]
    # the per-sequence reverse-KL estimate sum_t (log q - log p_T) of the student's own
    # samples falls as the policy gradient pulls the student onto the teacher
    assert statistics.fmean(kl[-3:]) < 0.7 * statistics.fmean(kl[:3]), kl
    # the sampler's log-probs equal the learner's (weights were synced each step)
    assert max(r["sampler_mismatch"] for r in rows) < 1e-3
    assert (run_dir / "models" / "final" / "model.safetensors").exists()
