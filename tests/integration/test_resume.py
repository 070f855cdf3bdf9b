"""A run killed mid-stage resumes from its last atomic checkpoint and ends where an unbroken
run ends (same weights), with nothing already written lost."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from raykd.pipeline.run import run_pipeline

from .conftest import tiny_config

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
    run_dir = run_pipeline(tiny_config(tmp_path, tiny_teacher, *args))
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

    resumed_dir = run_pipeline(tiny_config(tmp_path, tiny_teacher, *args))
    assert resumed_dir == run_dir
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # only steps 3 and 4 were trained again
    # earlier results were kept, not recomputed
    assert (run_dir / "eval" / "student_before.json").read_text() == before
    resumed = load_file(run_dir / "models" / "final" / "model.safetensors")
    for name, w in unbroken.items():
        torch.testing.assert_close(resumed[name], w, rtol=1e-5, atol=1e-6, msg=name)
