"""Tests for raykd.evaluate: Rouge-L tokenisation, code validity, retention and the report."""

from __future__ import annotations

import json
import math
import os

import pytest

from raykd.evaluate import (
    RougeTokenizer,
    code_validity,
    evaluate_predictions,
    extract_code,
    parse_rate,
    retention,
    rouge_l,
    rouge_l_scores,
    write_report,
)
from raykd.evaluate import report as report_module

# ----------------------------------------------------------------------------- Rouge-L


def test_tokenizer_keeps_accents_and_code_symbols():
    tok = RougeTokenizer()
    assert tok.tokenize("def f(x): return x+1") == [
        "def", "f", "(", "x", ")", ":", "return", "x", "+", "1",
    ]  # fmt: skip
    assert tok.tokenize("¿Por qué el cielo ESTÁ azul?") == [
        "¿", "por", "qué", "el", "cielo", "está", "azul", "?",
    ]  # fmt: skip
    # Porter stemming applies to ASCII words only (and, like rouge_score, to length > 3).
    assert tok.tokenize("running cats sat") == ["run", "cat", "sat"]
    assert tok.tokenize("canción") == ["canción"]
    assert RougeTokenizer(use_stemmer=False).tokenize("running") == ["running"]


def test_rouge_l_values():
    assert rouge_l(["está"], ["esta"]) == 0.0  # accents are not folded away
    assert rouge_l(["the same words here"], ["the same words here"]) == pytest.approx(100.0)
    assert rouge_l(["alpha beta"], ["gamma delta"]) == 0.0
    # LCS(the cat on a mat | the cat sat on the mat) = the cat on mat = 4 tokens:
    # P = 4/5, R = 4/6, F1 = 2PR / (P + R) = 8/11.
    assert rouge_l(["the cat on a mat"], ["the cat sat on the mat"]) == pytest.approx(800 / 11)
    # Spanish: LCS 4 of 4 predicted, 5 reference tokens -> F1 = 8/9.
    assert rouge_l(["el cielo está azul"], ["el cielo no está azul"]) == pytest.approx(800 / 9)
    # Code: "x+1" vs "x-1" differ only in the operator token (3 of 4 tokens shared).
    assert rouge_l(["return x+1"], ["return x-1"]) == pytest.approx(100 * 3 / 4)
    assert rouge_l_scores(["", "a b"], ["a b", "a b"]) == [0.0, pytest.approx(100.0)]
    assert rouge_l(["a b", "c"], ["a b", "d"]) == pytest.approx(50.0)
    assert math.isnan(rouge_l([], []))
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_l(["a", "b"], ["a"])


# ----------------------------------------------------------------------------- code validity


def test_extract_code():
    answer = "Here you go:\n```python\ndef f(x):\n    return x\n```\nHope it helps."
    assert extract_code(answer) == "def f(x):\n    return x"
    assert extract_code("```\ndef g():\n    pass") == "def g():\n    pass"  # cut off
    both = "```bash\npip install x\n```\n```py\ndef h():\n    pass\n```"
    assert extract_code(both) == "def h():\n    pass"
    assert extract_code("```bash\nls -la\n```") == "ls -la"
    assert extract_code("def plain():\n    pass\n") == "def plain():\n    pass"


@pytest.mark.parametrize(
    ("prediction", "name", "valid"),
    [
        ("", None, False),  # ast.parse("") succeeds, but an empty answer is no solution
        ("  \n\t\n", None, False),
        ("```python\n```", None, False),
        ("x = 1", None, False),  # parses but defines no function
        ("def f(x:\n    return x", None, False),
        ("def f(x):\n    return x + 1", None, True),
        ("def f(x):\n    return x + 1", "f", True),
        ("def f(x):\n    return x + 1", "g", False),
        ("```python\ndef g(a):\n    return a\n```", "g", True),
        ("async def fetch(u):\n    return await get(u)", "fetch", True),
        ("class A:\n    def method(self):\n        return 1", "method", True),
        ("def f():\n    return '\\d'", "f", True),  # SyntaxWarning only, still valid
        ("def f(\x00): pass", None, False),  # null byte: ValueError in ast.parse
    ],
)
def test_code_validity(prediction, name, valid):
    assert code_validity(prediction, name) is valid


def test_parse_rate_and_retention():
    preds = ["def f():\n    return 1", "def f(:", "", "def g():\n    return 2"]
    assert parse_rate(preds) == 50.0
    assert parse_rate(preds, ["f", "f", "f", "f"]) == 25.0
    assert parse_rate(preds, ["f", None, None, None]) == 50.0
    assert math.isnan(parse_rate([]))
    assert retention(30.0, 40.0) == pytest.approx(75.0)
    assert retention(50.0, 40.0) == pytest.approx(125.0)
    for student, teacher in [
        (30.0, 0.0),
        (30.0, None),
        (None, 40.0),
        (math.nan, 40.0),
        (1, math.inf),
    ]:
        assert math.isnan(retention(student, teacher))


def test_evaluate_predictions():
    reference = "def f(x):\n    return x + 1"
    out = evaluate_predictions(
        ["```python\n" + reference + "\n```", "not code at all"],
        [reference, reference],
        ["f", "f"],
        kind="code",
    )
    assert out["kind"] == "code" and out["num_examples"] == 2
    assert out["per_example"][0] == {"rouge_l": pytest.approx(100.0), "parses": True}
    assert out["per_example"][1] == {"rouge_l": 0.0, "parses": False}
    assert out["rouge_l"] == pytest.approx(50.0) and out["parse_rate"] == 50.0

    text = evaluate_predictions(["la casa azul"], ["la casa roja"], kind="text")
    assert "parse_rate" not in text and "parses" not in text["per_example"][0]
    assert text["rouge_l"] == pytest.approx(100 * 2 / 3)
    with pytest.raises(ValueError, match="kind"):
        evaluate_predictions([], [], kind="image")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- report


def _results() -> dict:
    sample = {"prompt": "Write `inc(x)`", "reference": "def inc(x):\n    return x + 1"}
    return {
        "task": "stdlib_code",
        "kind": "code",
        "models": {
            "student_after": {
                "rouge_l": 30.0,
                "parse_rate": 70.0,
                "params": 60_000_000,
                "size_bytes": 120_000_000,
                "samples": [{**sample, "prediction": "def inc(x):\n    return x | 1"}],
            },
            "teacher": {
                "rouge_l": 40.0,
                "parse_rate": 87.5,
                "params": 134_515_008,
                "size_mb": 270.1,
                "samples": [{**sample, "prediction": "def inc(x):\n    return x + 1"}],
            },
            "student_before": {"rouge_l": 10.0, "parse_rate": 35.0},
        },
        "stages": {"sft": {"steps": 100, "seconds": 12.5, "final_loss": 0.8123}},
        "compression": {"bits": 4, "ratio": 3.5},
    }


def test_write_report(tmp_path):
    curves = {"sft": [(0, 2.0), (50, 1.1), (100, 0.81)], "kd": [(0, 1.5), (10, 0.9)]}
    md_path = write_report(tmp_path / "run", _results(), curves)
    run = tmp_path / "run"
    assert md_path == run / "report.md"
    assert sorted(p.name for p in run.iterdir()) == ["report.json", "report.md", "report.png"]

    md = md_path.read_text(encoding="utf-8")
    lines = md.splitlines()
    header = lines.index(
        "| model | Rouge-L | parse rate | retention vs teacher | params | size MB |"
    )
    assert lines[header + 2 : header + 5] == [  # teacher first, then students in order
        "| teacher | 40.0 | 87.5 | — | 134.5M | 270.1 |",
        "| student_before | 10.0 | 35.0 | 25.0 | — | — |",
        "| student_after | 30.0 | 70.0 | 75.0 | 60.0M | 120.0 |",
    ]
    assert "| sft | 100 | 12.5 | 0.8123 |" in lines
    assert "| kd | — | — | 0.9000 |" in lines  # a stage known only from its curve
    assert "| bits | 4 |" in lines
    assert "| reference | teacher | student_after |" in lines
    assert "return x &#124; 1" in md  # '|' in a sample cannot break the table
    assert "&nbsp;&nbsp;&nbsp;&nbsp;return x + 1" in md

    data = json.loads((run / "report.json").read_text(encoding="utf-8"))
    assert list(data["models"]) == ["teacher", "student_before", "student_after"]
    assert data["models"]["student_after"]["retention"] == pytest.approx(75.0)
    assert data["models"]["student_after"]["retention_parse_rate"] == pytest.approx(80.0)
    assert data["curves"]["sft"] == [[0, 2.0], [50, 1.1], [100, 0.81]]
    assert data["compression"] == {"bits": 4, "ratio": 3.5}
    assert (run / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_with_missing_optional_fields(tmp_path):
    results = {"models": {"student_after": {"rouge_l": 12.0}, "teacher": {"rouge_l": 0.0}}}
    write_report(tmp_path, results)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| student_after | 12.0 | — | — | — | — |" in md  # teacher 0 -> retention n/a
    assert "No training stages recorded." in md and "Sample generations" not in md
    data = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert data["task"] == "unknown" and data["kind"] == "text"
    assert data["models"]["student_after"]["retention"] is None  # NaN is not valid JSON
    assert (tmp_path / "report.png").stat().st_size > 0


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    target.write_text("old", encoding="utf-8")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        report_module.atomic_write(target, "new")
    assert target.read_text(encoding="utf-8") == "old"
    assert os.listdir(tmp_path) == ["report.md"]  # the temporary file was removed
