"""benchmarks/render.py without running a benchmark: the marked section of BENCHMARKS.md is
replaced in place or inserted after the goals section, nothing outside the markers changes,
and a missing JSON or a missing key only affects its own subsection."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import render  # noqa: E402
from render import BEGIN, END, splice  # noqa: E402

DOC = """# title

intro

## Goals (issue 13) and where they stand

| goal | status |
|---|---|
| a | met |

## Next section

text
"""


def without_section(doc: str) -> str:
    """``doc`` minus the lines from BEGIN to END (inclusive)."""
    begin, end = doc.index(BEGIN), doc.index(END) + len(END) + 1
    return doc[:begin] + doc[end:]


def test_inserted_before_the_heading_after_the_goals():
    out = splice(DOC, "## Latest run (make bench)\n\nbody")
    assert without_section(out) == DOC
    assert out.index("| a | met |") < out.index(BEGIN) < out.index(END) < out.index("## Next")
    assert f"{BEGIN}\n## Latest run (make bench)\n\nbody\n\n{END}\n## Next section" in out


def test_replaced_in_place_and_idempotent():
    once = splice(DOC, "first")
    twice = splice(once, "second\n")
    assert without_section(twice) == DOC and "first" not in twice and "second" in twice
    assert splice(twice, "second") == twice
    # the markers elsewhere (moved by hand): replaced where they are
    moved = DOC + f"\n{BEGIN}\n(run `make bench`)\n{END}\n"
    out = splice(moved, "new")
    assert out == DOC + f"\n{BEGIN}\nnew\n\n{END}\n"


def test_appended_without_the_goals_heading_or_a_heading_after_it():
    doc = "# title\n\ntext"  # no final newline
    assert splice(doc, "x") == f"{doc}\n{BEGIN}\nx\n\n{END}\n"
    last = "# t\n\n## Goals (issue 13) and where they stand\n\nrow\n"
    assert splice(last, "x") == f"{last}{BEGIN}\nx\n\n{END}\n"
    # a "### " subheading inside the goals section is not the next section
    sub = DOC.replace("| a | met |\n", "| a | met |\n\n### detail\n")
    out = splice(sub, "x")
    assert out.index("### detail") < out.index(BEGIN) < out.index("## Next")


def test_begin_without_end_is_an_error():
    with pytest.raises(ValueError, match="without"):
        splice(DOC + f"{BEGIN}\nstale\n", "x")


def test_missing_json_and_missing_key(tmp_path):
    hf = {"model": "tiny", "state_dict_mb": 2.0, "unique_storage_mb": 1.5, "shipped_mb": 1.5,
          "shipped_tensors": 10, "samplers": 2,
          "sync_seconds": {"shared_memory": {"median": 0.01234, "min": 0.01, "max": 0.02},
                           "object_store": {"median": 0.05, "min": 0.04, "max": 0.06}},
          "first_sync_seconds": {"shared_memory": 0.1, "object_store": 0.2},
          "sync_vs_plain_copy": {"shared_memory": 1.5, "object_store": 6.0},
          "plain_copy_seconds": {"median": 0.008, "min": 0.007, "max": 0.009}}  # fmt: skip
    ws = {"benchmark": "weight_sync", "time": "2026-01-02 03:04:05", "repeats": 2, "hf": hf,
          "vllm_skipped": "--quick", "machine": {"cpu": "cpu", "cores": 2, "versions": {}}}  # fmt: skip
    (tmp_path / "weight_sync_quick.json").write_text(json.dumps(ws))
    (tmp_path / "teacher_scoring_quick.json").write_text(json.dumps({"examples": 8}))
    (tmp_path / "learner_step_quick.json").write_text("{not json")
    text = render.render(tmp_path, quick=True, head="abc1234")
    prose = " ".join(text.split())  # the prose is wrapped at 95 columns
    assert text.startswith("## Latest run (make bench) — quick runs, tiny models")
    assert "| shared_memory (hf workers) | 0.012 | 0.010 | 0.020 | 0.100 | 1.50× |" in text
    assert "| plain copy ×2 | 0.008 |" in text and "vLLM part skipped: --quick." in prose
    assert "2026-01-02 03:04:05" in prose and "`abc1234` (HEAD when rendered" in prose
    sections = text.split("\n### ")[1:]
    assert [s.split(" ", 1)[0] for s in sections] == [
        "learner_step", "weight_sync", "teacher_scoring"]  # fmt: skip
    assert "Not rendered: JSONDecodeError" in sections[0]
    assert "Not rendered: key 'token_logprobs' missing from the JSON." in " ".join(
        sections[2].split()
    )
    assert "`onpolicy_step`" in prose.split("Not run", 1)[1]
    # the full-run files are not the quick ones
    assert "### " not in render.render(tmp_path, quick=False, head=None)
