"""raykd compare: rows, retention, seed means and paired differences from recorded run files."""

import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from raykd.cli import main
from raykd.evaluate.compare import (
    BEGIN,
    END,
    compare_runs,
    load_run,
    paired_difference,
    splice,
    write_comparison,
)

TEACHER = "/runs/a/models/teacher-sft"


def model(scores, parse=100.0, clean=50.0, humaneval=None, non_embedding=60_000_000):
    rec = {
        "rouge_l": statistics.fmean(scores),
        "parse_rate": parse,
        "clean_stop_rate": clean,
        "per_example": [{"rouge_l": s} for s in scores],
        "params": non_embedding + 1_000,  # eval records hold the total
    }
    if humaneval is not None:
        rec["humaneval"] = {"pass_at_1": humaneval}
    return rec


def make_run(root: Path, algorithm: str, seed: int, scores, seconds: float, *, teacher=False,
             split_seed=0, teacher_model=TEACHER) -> Path:  # fmt: skip
    stage = f"1-{algorithm}"
    cfg = {
        "run": {"name": root.name, "seed": seed},
        "teacher": {"model": teacher_model},
        "data": {"task": "package_code", "num_eval": len(scores), "eval_fraction": 0.2,
                 "max_length": 256, "split_seed": split_seed},
        "pipeline": {"stages": [{"name": "teacher-sft", "algorithm": "sft", "trains": "teacher"},
                                {"name": stage, "algorithm": algorithm}]},
    }  # fmt: skip
    (root / "eval").mkdir(parents=True)
    (root / "stages").mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    (root / "stages" / f"{stage}.json").write_text(json.dumps({"seconds": seconds}))
    (root / "stages" / "teacher-sft.json").write_text(json.dumps({"seconds": 780.0}))
    (root / "stages" / "data.json").write_text("{}")
    built = {"params": {"non_embedding": 60_000_000}, "teacher_params": {"non_embedding": 106e6}}
    (root / "stages" / "student.json").write_text(json.dumps(built))
    (root / "eval" / "student_after.json").write_text(json.dumps(model(scores, humaneval=0.0)))
    if teacher:
        tuned = {**model([40.0] * len(scores), humaneval=2.0), "model_path": TEACHER}
        (root / "eval" / "teacher.json").write_text(json.dumps(tuned))
        (root / "eval" / "student_before.json").write_text(json.dumps(model([4.0] * len(scores))))
        (root / "eval" / "stub.json").write_text(json.dumps(model([20.0] * len(scores))))
    return root


def test_rows_retention_seed_means_and_paired_differences(tmp_path):
    kd0 = make_run(tmp_path / "kd0", "word_kd", 0, [36.0, 30.0, 42.0], 1200.0, teacher=True)
    kd1 = make_run(tmp_path / "kd1", "word_kd", 1, [38.0, 28.0, 44.0], 1230.0)
    sft = make_run(tmp_path / "sft", "sft", 0, [30.0, 31.0, 35.0], 1180.0)
    result = compare_runs([load_run(p) for p in (kd0, kd1, sft)])

    refs = {r["label"]: r for r in result["references"]}
    assert refs["teacher"]["retention"] == pytest.approx(100.0)
    assert refs["teacher"]["non_embedding"] == 106e6 and refs["stub"]["non_embedding"] is None
    assert refs["stub"]["retention"] == pytest.approx(50.0)  # 20 / 40
    assert refs["student_before"]["retention"] == pytest.approx(10.0)
    runs = {r["run"]: r for r in result["runs"]}
    assert runs["kd0"]["retention"] == pytest.approx(100 * 36.0 / 40.0)
    assert runs["kd0"]["minutes"] == pytest.approx(20.0)  # the student stage only, not teacher-sft
    assert runs["sft"]["method"] == "sft" and runs["kd1"]["seed"] == 1

    kd = result["methods"]["word_kd"]
    assert kd["seeds"] == [0, 1]
    assert kd["rouge_l"] == pytest.approx((36.0 + 36.6667) / 2, abs=1e-3)
    assert kd["rouge_l_spread"] == pytest.approx(36.6667 - 36.0, abs=1e-3)
    assert kd["minutes"] == pytest.approx((20.0 + 20.5) / 2)
    assert result["methods"]["sft"]["rouge_l_spread"] is None  # one seed: no spread

    # paired: per-example scores averaged over seeds first, then a - b per example
    (pair,) = result["paired"]
    assert (pair["a"], pair["b"]) == ("sft", "word_kd")
    diffs = [30.0 - 37.0, 31.0 - 29.0, 35.0 - 43.0]
    assert pair["mean"] == pytest.approx(sum(diffs) / 3)
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert pair["stderr"] == pytest.approx(sd / math.sqrt(3))


def test_phase_minutes_sum_the_logged_steps_and_the_rest_is_setup(tmp_path):
    kd0 = make_run(tmp_path / "kd0", "word_kd", 0, [36.0, 30.0], 1200.0, teacher=True)
    rows = [{"stage": "1-word_kd", "step": s, "time/step": 590.0, "time/learner": 400.0,
             "time/teacher": 150.0} for s in (1, 2)]  # fmt: skip
    rows.append({**rows[1], "time/learner": 410.0})  # step 2 logged again after a resume
    rows.append({"stage": "teacher-sft", "step": 1, "time/step": 99.0, "time/learner": 99.0})
    (kd0 / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run,) = compare_runs([load_run(kd0)])["runs"]
    assert run["phases"]["learner"] == pytest.approx(810.0 / 60)  # latest row of step 2 wins
    assert run["phases"]["teacher"] == pytest.approx(300.0 / 60)
    assert run["phases"]["setup"] == pytest.approx((1200.0 - 1180.0) / 60)


def test_runs_on_another_held_out_set_or_teacher_are_refused(tmp_path):
    a = make_run(tmp_path / "a", "word_kd", 0, [36.0, 30.0], 1200.0, teacher=True)
    other_split = make_run(tmp_path / "b", "sft", 1, [30.0, 31.0], 1180.0, split_seed=None)
    with pytest.raises(ValueError, match=r"held-out set.*not comparable"):
        compare_runs([load_run(a), load_run(other_split)])
    other_teacher = make_run(tmp_path / "c", "sft", 0, [30.0, 31.0], 1180.0,
                             teacher_model="/elsewhere/teacher")  # fmt: skip
    with pytest.raises(ValueError, match=r"differ in the teacher.*elsewhere"):
        compare_runs([load_run(a), load_run(other_teacher)])
    no_teacher = make_run(tmp_path / "d", "sft", 0, [30.0, 31.0], 1180.0)
    with pytest.raises(ValueError, match="no run evaluated the teacher"):
        compare_runs([load_run(no_teacher)])


def test_paired_difference_against_float_math():
    mean, sem = paired_difference([1.0, 4.0, 9.0, 16.0], [1.0, 2.0, 3.0, 4.0])
    diffs = [0.0, 2.0, 6.0, 12.0]
    assert mean == pytest.approx(5.0)
    assert sem == pytest.approx(statistics.stdev(diffs) / 2.0)
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_difference([1.0], [1.0, 2.0])


def test_markdown_markers_are_filled_and_the_rest_kept(tmp_path):
    kd0 = make_run(tmp_path / "kd0", "word_kd", 0, [36.0, 30.0], 1200.0, teacher=True)
    page = tmp_path / "results.md"
    page.write_text(f"# Results\nintro\n{BEGIN}\nold table\n{END}\nreading\n")
    png = tmp_path / "plot.png"
    write_comparison([kd0], page, png, "t")
    text = page.read_text()
    assert text.startswith("# Results\nintro\n") and text.endswith(f"{END}\nreading\n")
    assert "old table" not in text
    assert "| student (word_kd) | kd0 | 0 | 60.0M | 20.0 | 33.0 | 82.5 |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert splice(text, "new\n").count(BEGIN) == 1
    with pytest.raises(ValueError, match="markers"):
        splice("no markers here", "x")


def test_cli_names_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert f"{tmp_path}: not a raykd run directory" in capsys.readouterr().err
