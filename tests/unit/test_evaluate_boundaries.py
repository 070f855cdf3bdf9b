"""Boundary tests of ``evaluate_predictions``' code validity, end to end: an empty output is
not valid code, and code must define the function it was asked for."""

from __future__ import annotations

import pytest

from raykd.evaluate.metrics import evaluate_predictions

REFERENCE = "def add(a, b):\n    return a + b"


def _parses(predictions, names):
    out = evaluate_predictions(predictions, [REFERENCE] * len(predictions), names, kind="code")
    return [e["parses"] for e in out["per_example"]], out["parse_rate"]


@pytest.mark.parametrize("empty", ["", "\n\n", "```python\n```", "```\n\n```"])
def test_empty_output_is_not_valid_code(empty):
    """Mutation: validity reduced to "``ast.parse`` succeeds" (``ast.parse("")`` does), or the
    blank check dropped. With and without a requested name, an empty answer is invalid, and
    it counts against the parse rate."""
    parses, rate = _parses([empty, REFERENCE], ["add", "add"])
    assert parses == [False, True] and rate == 50.0
    parses, rate = _parses([empty], None)
    assert parses == [False] and rate == 0.0


def test_code_defining_another_function_is_not_valid_for_the_requested_name():
    """Mutation: ``evaluate_predictions`` not passing ``names`` on to the validity check (or
    the check ignoring the name). Valid Python that defines ``sub`` is no answer to "write
    ``add``"; the same code is valid when any function is accepted (``None``)."""
    other = "def sub(a, b):\n    return a - b"
    nested = "def outer():\n    def add(a, b):\n        return a + b\n    return add"
    predictions = [other, REFERENCE, "```python\n" + other + "\n```", nested, other]
    parses, rate = _parses(predictions, ["add", "add", "add", "add", None])
    assert parses == [False, True, False, True, True]
    assert rate == pytest.approx(60.0)
    # names=None accepts any function
    parses, rate = _parses([other], None)
    assert parses == [True] and rate == 100.0
