"""The pipeline with vLLM rollout workers and vLLM teacher scorers end to end: on-policy
reverse KL (weights back to the engines over the gloo torch group each step) and GRPO
(groups of draws of one prompt), then the evaluation decodes through vLLM as well."""

from __future__ import annotations

import json

import pytest

from raykd.pipeline.run import run_pipeline

from .conftest import run_dir_of, tiny_config
from .test_vllm import build_vllm_tiny_model, require_vllm

pytestmark = pytest.mark.integration


def test_reverse_kl_and_grpo_with_vllm_sampling_and_scoring(ray_node, tmp_path):
    require_vllm()
    teacher = build_vllm_tiny_model(tmp_path / "teacher")
    cfg = tiny_config(
        tmp_path,
        teacher,
        "pipeline.train=[reverse_kl,grpo]",
        "pipeline.eval_teacher=false",
        "pipeline.eval_student_before=false",
        "eval.sample_seeds=[]",
        "rollout.backend=vllm",
        "teacher.backend=vllm",
        "rollout.weight_sync=torch_group",
        "rollout.sync_bucket_mb=0.05",
        "reverse_kl.steps=2",
        "reverse_kl.prompts_per_step=4",
        "grpo.steps=2",
        "grpo.prompts_per_step=2",
        "grpo.group_size=2",
        "grpo.rewards=[length]",
        "learner.lr=1e-3",
    )
    run_dir = run_dir_of(run_pipeline(cfg))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rkl = [r for r in rows if r["stage"] == "1-reverse_kl"]
    grpo = [r for r in rows if r["stage"] == "2-grpo"]
    assert [r["step"] for r in rkl] == [1, 2] and [r["step"] for r in grpo] == [1, 2]
    # the engine's log-probs equal the learner's: the first step's weights came from disk,
    # the second's over the torch group
    assert max(r["sampler_mismatch"] for r in rkl) < 1e-3, rkl
    assert all(r["sync_buckets"] > 3 and r["response_tokens"] > 0 for r in rkl)
    assert "sync_connect_seconds" in rkl[0] and "sync_connect_seconds" not in rkl[1]
    assert all(r["sync_seconds"] > 0 for r in grpo)
    assert (run_dir / "models" / "final" / "model.safetensors").exists()
    report = json.loads((run_dir / "report.json").read_text())
    assert report  # the evaluation decoded through the vLLM sampler
