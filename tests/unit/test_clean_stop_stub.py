"""The clean-stop rate and the signature stub (issue 12): the measures that a format-only
answer cannot fool, on hand-written answers whose verdicts are known."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from raykd.batch import Example
from raykd.evaluate.baselines import stub_answer
from raykd.evaluate.generation import evaluate_stub
from raykd.evaluate.metrics import clean_stop, code_validity, evaluate_predictions
from raykd.evaluate.report import render_markdown, summarize

FN = "def get(self, key):\n    return self.d[key]"
FENCED = f"```python\n{FN}\n```"
REPEATED = f"{FN}\n```\n\n{FN}\n```"  # the quickstart student's failure mode


@pytest.mark.parametrize(
    ("answer", "name", "stopped", "clean"),
    [
        (FN, "get", True, True),
        (FENCED, "get", True, True),
        (f"\n{FENCED}\n\n", "get", True, True),
        (f"import os\n{FN}", "get", True, True),
        (FN, "get", False, False),  # cut at the token limit
        (REPEATED, "get", True, False),  # a stray fence, then the function again
        (f"{FENCED}\n\nThis function returns the value.", "get", True, False),  # prose after
        (f"Here it is:\n{FENCED}", "get", True, False),  # prose before
        (f"{FN}\n\ndef helper():\n    pass", "get", True, False),  # two functions
        (f"{FN}\nprint(get(None, 1))", "get", True, False),  # code after
        (FN, "put", True, False),  # not the requested function
        ("```js\nfunction get() {}\n```", None, True, False),
        ("def get(self, key):\n    return (", "get", True, False),  # does not parse
        ("", None, True, False),
    ],
)
def test_clean_stop(answer, name, stopped, clean):
    assert clean_stop(answer, name, stopped) is clean


def test_parse_rate_is_fooled_where_clean_stop_is_not():
    """The repeated answer still counts as valid code (the fence's body is one function)."""
    assert code_validity(REPEATED, "get") and not clean_stop(REPEATED, "get")


def test_evaluate_predictions_adds_the_clean_stop_rate():
    preds, refs = [FN, REPEATED, FENCED, FN], [FN] * 4
    got = evaluate_predictions(preds, refs, ["get"] * 4, "code", stopped=[True, True, True, False])
    assert got["clean_stop_rate"] == 50.0
    assert [e["clean_stop"] for e in got["per_example"]] == [True, False, True, False]
    assert got["parse_rate"] == 100.0
    assert "clean_stop_rate" not in evaluate_predictions(preds, refs, None, "code")
    with pytest.raises(ValueError, match="4 predictions but 3"):
        evaluate_predictions(preds, refs, None, "code", stopped=[True] * 3)


def _ex(prompt, **meta):
    return Example("u", [1], [2], prompt_text=prompt, reference="", meta=meta)


def test_stub_repeats_the_requested_signature():
    ex = _ex("Write a Python function `get(self, key, default=None) -> int` (a method of class "
             "`Box`) that: returns the value.", name="get")  # fmt: skip
    assert stub_answer(ex) == "def get(self, key, default=None) -> int:\n    pass"
    setup = "from typing import List\n\n\ndef has_close(numbers: List[float], t: float) -> bool:\n"
    he = _ex("Complete the following function ...", entry_point="has_close", setup=setup)
    assert stub_answer(he) == "def has_close(numbers: List[float], t: float) -> bool:\n    pass"
    # a backticked call of another function in the prompt is not the signature
    assert stub_answer(_ex("Use `len(x)` to count.", name="count")) == "def count():\n    pass"


def test_stub_row_is_valid_clean_and_passes_no_test():
    """The floor the issue describes: 100% valid, 100% clean, Rouge-L > 0, pass@1 0."""
    ref = "def add(a, b):\n    return a + b"
    ex = Example("fn/add", [1], [2], prompt_text="Write a Python function `add(a, b)` that: "
                 "adds.", reference=ref,
                 meta={"name": "add", "entry_point": "add", "tests": ["assert add(1, 2) == 3"],
                       "format": "code"})  # fmt: skip
    cfg = SimpleNamespace(exec_timeout_s=5.0, pass_k=[1], num_report_samples=1)
    got = evaluate_stub([ex, ex], "code", cfg)
    assert got["parse_rate"] == 100.0 and got["clean_stop_rate"] == 100.0
    assert 0 < got["rouge_l"] < 100 and got["pass_at_1"] == 0.0
    assert got["predictions"] == ["def add(a, b):\n    pass"] * 2


def test_report_shows_clean_stop_and_humaneval_columns_with_the_stub_first():
    results = {
        "task": "stdlib_code", "kind": "code",
        "models": {
            "teacher": {"rouge_l": 40.0, "parse_rate": 90.0, "clean_stop_rate": 10.0,
                        "humaneval": {"pass_at_1": 9.1, "num_examples": 164}},
            "student_after": {"rouge_l": 30.0, "parse_rate": 80.0, "clean_stop_rate": 75.0},
            "stub": {"rouge_l": 35.0, "parse_rate": 100.0, "clean_stop_rate": 100.0,
                     "humaneval": {"pass_at_1": 0.0, "num_examples": 164}},
        },
    }  # fmt: skip
    md = render_markdown(summarize(results))
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model | Rouge-L | parse rate | clean stop |")
    assert "HumanEval pass@1" in rows[0]
    assert rows[1].startswith("| stub | 35.0 | 100.0 | 100.0 | 0.0 |")
    assert rows[2].startswith("| teacher | 40.0 | 90.0 | 10.0 | 9.1 |")
    assert rows[3].startswith("| student_after | 30.0 | 80.0 | 75.0 | — |")
    assert "of its 164 problems" in md
    assert not math.isnan(summarize(results)["models"]["stub"]["retention"])
