"""Teacher fine-tuning: SFT the teacher first; the fine-tuned teacher is then the one the
student is cut from, distilled from and compared to."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raykd.pipeline.run import run_pipeline
from raykd.roles.target_cache import default_cache_root, model_fingerprint

from .conftest import run_dir_of, tiny_config

pytestmark = pytest.mark.integration


def test_finetuned_teacher_teaches(ray_node, tiny_teacher, tmp_path):
    cfg = tiny_config(
        tmp_path,
        tiny_teacher,
        "pipeline.finetune_teacher=true",
        "teacher_sft.steps=4",
        "teacher_sft.lr=1e-3",
        "pipeline.train=[word_kd]",
        "word_kd.steps=2",
        "pipeline.eval_student_before=false",
    )
    run_dir = run_dir_of(run_pipeline(cfg))
    tuned = run_dir / "models" / "teacher-sft"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sft_rows = [r for r in rows if r["stage"] == "teacher-sft"]
    assert [r["step"] for r in sft_rows] == [1, 2, 3, 4]
    assert sft_rows[-1]["loss"] < sft_rows[0]["loss"]

    # the teacher changed, and the student was cut from the fine-tuned one
    base_w = load_file(Path(tiny_teacher) / "model.safetensors")
    tuned_w = load_file(tuned / "model.safetensors")
    student_w = load_file(run_dir / "models" / "student_init" / "model.safetensors")
    layers = json.loads((run_dir / "stages" / "student.json").read_text())["layers"]
    name = "model.layers.{}.mlp.down_proj.weight"
    assert not torch.equal(tuned_w[name.format(layers[1])], base_w[name.format(layers[1])])
    assert torch.equal(student_w[name.format(1)], tuned_w[name.format(layers[1])])

    # both teachers are evaluated; the fine-tuned one is "the teacher"
    evals = {m: json.loads((run_dir / "eval" / f"{m}.json").read_text()) for m in
             ("teacher", "teacher_base")}  # fmt: skip
    assert Path(evals["teacher"]["model_path"]) == tuned
    assert Path(evals["teacher_base"]["model_path"]) == Path(tiny_teacher)
    assert "| teacher_base |" in (run_dir / "report.md").read_text()
    # word-KD targets came from the fine-tuned teacher (the cache is keyed by its weights)
    cached = os.listdir(default_cache_root())
    assert any(d.startswith(model_fingerprint(str(tuned))) for d in cached), cached

    # a rerun skips the finished teacher stage
    run_dir_of(run_pipeline(cfg))
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(x)["stage"] == "teacher-sft" for x in rows) == 4
