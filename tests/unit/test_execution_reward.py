"""Execution reward and execution metrics: completions' code runs against the problem's tests
in the sandbox. Correct, wrong, partial and hostile completions get the values the tests
say; pass@k matches a brute-force count over subsets of samples."""

from __future__ import annotations

import itertools
import math
import time

import pytest

from raykd.batch import Example
from raykd.evaluate.execution import (
    answer_code,
    execution_metrics,
    format_ok,
    pass_at_k,
    program_for,
    reasoning_words,
    run_tests,
)
from raykd.evaluate.report import render_markdown, summarize
from raykd.rewards import REWARDS, combine, format_reward, get_reward

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # missing sandbox layers

TESTS = ["assert inc(1) == 2", "assert inc(5) == 6", "assert inc(0) == 0"]
PROBLEM = Example("p", [], [], meta={"tests": TESTS, "entry_point": "inc", "format": "code"})
FAST = {"timeout": 2.0}


def reward(completions, problem=PROBLEM, **params):
    return get_reward("execution", **{**FAST, **params})([problem] * len(completions),
                                                          completions)  # fmt: skip


def test_correct_wrong_and_partial_completions():
    got = reward([
        "```python\ndef inc(x):\n    return x + 1 if x else 0\n```",  # all 3
        "def inc(x):\n    return x + 1",  # fails inc(0) == 0: 2 of 3
        "def inc(x):\n    return 0",  # only inc(0): 1 of 3
        "def inc(x):\n    return x - 1",  # none
        "Sure! Here is the function: def inc(x) return x",  # no parseable code
        "",
    ])  # fmt: skip
    assert got == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0, 0.0, 0.0])


def test_all_or_nothing():
    got = reward(["def inc(x):\n    return x + 1 if x else 0", "def inc(x):\n    return x + 1"],
                 mode="all_or_nothing")  # fmt: skip
    assert got == [1.0, 0.0]


HOSTILE = {
    "exit_before_tests": "import os\ndef inc(x):\n    return x + 1 if x else 0\nos._exit(0)",
    "sys_exit": "import sys\ndef inc(x):\n    return x + 1 if x else 0\nsys.exit(0)",
    "fake_pass": "print('passed')\nprint('3/3 tests passed')\nraise SystemExit(0)",
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
                   "def inc(x):\n    return x + 1 if x else 0",
    "infinite_loop": "while True:\n    pass",
    "fork": "import os\nos.fork()\ndef inc(x):\n    return x + 1 if x else 0",
    "memory_bomb": "x = 'a' * (1 << 34)\ndef inc(x):\n    return x + 1 if x else 0",
    "patch_assert": "import builtins\nbuiltins.AssertionError = type('E', (BaseException,), {})\n"
                    "def inc(x):\n    return 0",
    "read_tests": "import glob\nfor f in glob.glob('**', recursive=True) + glob.glob('/tmp/*'):\n"
                  "    try:\n        print(open(f).read())\n    except Exception:\n        pass\n"
                  "def inc(x):\n    return 0",
}  # fmt: skip


def test_hostile_completions_get_nothing():
    t0 = time.monotonic()
    got = reward(list(HOSTILE.values()), timeout=1.0)
    by_name = dict(zip(HOSTILE, got))
    # patch_assert / read_tests define inc(x) = 0, which really passes inc(0) == 0: 1 of 3
    assert by_name.pop("patch_assert") == pytest.approx(1 / 3)
    assert by_name.pop("read_tests") == pytest.approx(1 / 3)
    assert all(v == 0.0 for v in by_name.values()), by_name
    assert time.monotonic() - t0 < 30  # the loop is cut at the timeout


def test_input_output_tests_and_reasoning_format():
    io = Example("io", [], [], meta={"tests": [{"input": "3\n", "output": "6"},
                                                {"input": "0\n", "output": "0\n"}]})  # fmt: skip
    answer = (
        "<think>double it</think>\n<answer>\n```python\nprint(2 * int(input()))\n```\n</answer>"
    )
    got = reward([answer, "print(6)", "print(int(input()) + 3)"], problem=io)
    assert got == pytest.approx([1.0, 0.5, 0.5])


def test_setup_and_body_continuation():
    """HumanEval style: the prompt is run first; a bare body continues its signature."""
    setup = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum."""\n'
    he = Example("he", [], [], meta={"tests": ["def check(c):\n    assert c([1, 2]) == 3\n\n"
                                               "check(total)"],
                                     "setup": setup, "entry_point": "total"})  # fmt: skip
    got = reward(["    return sum(xs)\n", "def total(xs: List[int]) -> int:\n    return sum(xs)",
                  "    return 0\n"], problem=he)  # fmt: skip
    assert got == [1.0, 1.0, 0.0]
    assert program_for("    return sum(xs)", he.meta).startswith(setup)


def test_batch_without_tests_is_an_error_and_mixed_batches_score_zero():
    bare = Example("t", [], [])
    with pytest.raises(ValueError, match="no example in the batch has meta\\['tests'\\]"):
        get_reward("execution")([bare], ["x = 1"])
    got = get_reward("execution", **FAST)([bare, PROBLEM], ["x", "def inc(x): return 0"])
    assert got == pytest.approx([0.0, 1 / 3])
    with pytest.raises(ValueError, match="mode"):
        reward(["x"], mode="most")


def test_sandbox_requirement_is_enforced():
    from raykd.sandbox import SandboxUnavailable, probe

    missing = [n for n in ("seccomp", "landlock", "namespaces") if not probe().get(n)]
    if not missing:
        assert reward(["def inc(x): return 0"], require=["seccomp", "landlock"]) == [
            pytest.approx(1 / 3)
        ]
    else:
        with pytest.raises(SandboxUnavailable, match=missing[0]):
            reward(["x"], require=missing)


def test_combined_with_text_rewards():
    fn = combine(["execution", "format"], [1.0, 0.5], {"execution": FAST})
    totals, parts = fn.score(
        [PROBLEM] * 2,
        ["def inc(x): return 0", "<think>a</think><answer>def inc(x): return 0</answer>"],
    )
    assert parts["execution"] == pytest.approx([1 / 3, 1 / 3])
    assert parts["format"] == [0.0, 1.0]
    assert totals == pytest.approx([1 / 3, 1 / 3 + 0.5])
    assert "execution" in REWARDS


# ---- pass@k, format, reasoning length ---------------------------------------------------
def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k)), (n, c, k)
    assert pass_at_k(n, 1, 1) == pytest.approx(1 / n)
    with pytest.raises(ValueError):
        pass_at_k(n, n + 1, 1)


def test_answer_code_format_and_reasoning_words():
    text = "<think>one two three</think>\n<answer>```python\ndef f(): pass\n```</answer>"
    assert answer_code(text) == "def f(): pass"
    assert reasoning_words(text) == 3 and reasoning_words("def f(): pass") == 0
    assert format_ok(text, {"format": "think_answer"})
    assert not format_ok("<think>x</think><answer></answer>", {"format": "think_answer"})
    assert format_ok("def f(): pass", {"entry_point": "f"})
    assert not format_ok("def g(): pass", {"entry_point": "f"})
    assert not format_ok("", {})
    for s in (text, "<think>x</think>", "<think>a</think><answer>b</answer> tail", ""):
        from raykd.evaluate.execution import REASONING_FORMAT

        assert bool(REASONING_FORMAT.fullmatch(s)) == (format_reward("", s, "") == 1.0)


def test_execution_metrics_and_report():
    right, wrong = "def inc(x):\n    return x + 1 if x else 0", "def inc(x):\n    return x"
    text = Example("t", [], [])  # no tests: not counted
    exs = [PROBLEM, PROBLEM, text]
    greedy = [right, wrong, "prose"]
    sampled = [[right, right, ""], [wrong, right, ""], [wrong, wrong, ""]]  # c = 1 and 2 of 3
    out = execution_metrics(exs, greedy, sampled, ks=(1, 2, 5))
    assert out["num_with_tests"] == 2 and out["pass_at_1"] == 50.0
    assert out["pass_at_1_stderr"] == pytest.approx(100 * math.sqrt(0.25 / 2))
    assert out["sampled_pass_at_1"] == pytest.approx(100 * (1 / 3 + 2 / 3) / 2)
    assert out["sampled_pass_at_2"] == pytest.approx(100 * (pass_at_k(3, 1, 2) + 1.0) / 2)
    assert "sampled_pass_at_5" not in out  # k > n
    assert out["format_rate"] == 100.0 and out["reasoning_words"] == 0
    assert out["per_example"][2] is None and out["per_example"][1]["tests_passed"] == 1
    assert out["tests_passed"] == pytest.approx((100 + 100 / 3) / 2)
    assert execution_metrics([text], ["x"]) == {}

    models = {"student": {"rouge_l": 10.0, "parse_rate": 50.0, **out}, "base": {"rouge_l": 1.0}}
    md = render_markdown(summarize({"kind": "code", "models": models}))
    assert "pass@1" in md and "50.0 ± 35.4" in md and "@1 50.0, @2" in md


def test_run_tests_statuses():
    outs = run_tests([PROBLEM] * 3, ["def inc(x): return x + 1 if x else 0", "not python (",
                                     "while True: pass"],
                     per_test=False, limits=__import__("raykd.sandbox").sandbox.Limits(timeout=1))  # fmt: skip
    assert [o.status for o in outs] == ["passed", "no_code", "timeout"]
    assert [o.passed for o in outs] == [3, 0, 0]
