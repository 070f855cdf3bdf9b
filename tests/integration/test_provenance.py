"""Results always match their config: a rerun of a finished run directory with another
config is refused before anything is written; run.overwrite=true redoes the affected stages;
the same config resumes (skips what is done)."""

from __future__ import annotations

import json

import pytest

from raykd.pipeline.provenance import RunDirConflict
from raykd.pipeline.run import run_pipeline

from .conftest import run_dir_of, tiny_config

pytestmark = pytest.mark.integration

ARGS = ("pipeline.train=[sft,sft]", "sft.steps=1", "pipeline.eval_teacher=false",
        "pipeline.eval_student_before=false", "eval.sample_seeds=[]")  # fmt: skip


def test_rerun_with_another_config_is_refused_and_overwrite_redoes_from_the_change(
    ray_node, tiny_teacher, tmp_path
):
    run_dir = run_dir_of(run_pipeline(tiny_config(tmp_path, tiny_teacher, *ARGS)))
    config_before = (run_dir / "config.yaml").read_text()
    first = {s: json.loads((run_dir / "stages" / f"{s}.json").read_text())
             for s in ("student", "1-sft", "2-sft")}  # fmt: skip

    # another config: refused, naming the key, before anything is written
    changed = tiny_config(tmp_path, tiny_teacher, *ARGS, "pipeline.stages=[{algorithm: sft}, "
                          "{algorithm: sft, steps: 2}]")  # fmt: skip
    with pytest.raises(RunDirConflict, match=r"pipeline.stages.*run.overwrite=true"):
        run_pipeline(changed)
    assert (run_dir / "config.yaml").read_text() == config_before
    # run.resume=false on a finished directory: refused too
    with pytest.raises(RunDirConflict, match="run.resume=false"):
        run_pipeline(tiny_config(tmp_path, tiny_teacher, *ARGS, "run.resume=false"))

    # the same config: every step is reused as it is
    again = run_dir_of(run_pipeline(tiny_config(tmp_path, tiny_teacher, *ARGS)))
    for s, record in first.items():
        assert json.loads((again / "stages" / f"{s}.json").read_text()) == record

    # overwrite: the first stage is unchanged and kept, the second is redone with 2 steps
    run_pipeline(tiny_config(tmp_path, tiny_teacher, *ARGS, "run.overwrite=true",
                             "pipeline.stages=[{algorithm: sft}, {algorithm: sft, steps: 2}]"))  # fmt: skip
    kept = json.loads((run_dir / "stages" / "1-sft.json").read_text())
    redone = json.loads((run_dir / "stages" / "2-sft.json").read_text())
    assert kept == first["1-sft"]
    assert redone["steps"] == 2 and redone["config_hash"] != first["2-sft"]["config_hash"]
    assert "steps: 2" in (run_dir / "config.yaml").read_text()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "2-sft" and "loss" in r][-2:] == [1, 2]
