"""Rule-based GRPO rewards: values of each registered reward and their weighted combination.

Rewards are batch functions ``fn(examples, completions) -> list[float]``; ``_one`` calls one
on a batch of one to read a single value."""

import pytest

from raykd.batch import Example
from raykd.rewards import REWARDS, combine, format_reward, get_reward, per_completion


def _one(fn):
    def call(prompt, completion, reference, **params):
        ex = Example("u", [], [], prompt_text=prompt, reference=reference)
        (value,) = fn([ex], [completion], **params)
        return value

    return call


def test_registry_names():
    assert set(REWARDS) >= {"format", "reasoning_steps", "length", "reference_overlap"}


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>add them</think><answer>4</answer>", 1.0),
        ("  <think>\nmulti\nline\n</think>\n\n<answer>4</answer>\n", 1.0),
        ("<think></think><answer></answer>", 1.0),
        ("<answer>4</answer><think>x</think>", 0.0),  # wrong order
        ("<think>x</think>", 0.0),  # no answer
        ("<answer>4</answer>", 0.0),  # no think
        ("Sure! <think>x</think><answer>4</answer>", 0.0),  # text before
        ("<think>x</think><answer>4</answer> done", 0.0),  # text after
        ("<think>x</think>so<answer>4</answer>", 0.0),  # text between
        ("<think>a<think>b</think><answer>4</answer>", 0.0),  # nested tag
        ("<think>x</think><answer>4</answer><answer>5</answer>", 0.0),  # two answers
        ("", 0.0),
    ],
)
def test_format(completion, expected):
    assert _one(REWARDS["format"])("q", completion, "ref") == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("The answer is 4.", 0.0),
        ("Step 1: add.", 1 / 3),
        ("First, add. Next, check.", 2 / 3),
        ("1. add\n2. check\n3) done", 1.0),
        ("Step 1: a. Step 2: b. Step 3: c. Step 4: d. Finally, e.", 1.0),  # capped
        ("I have 2. apples", 0.0),  # a number mid-line is no step
        ("Then, go.\n  2. again", 2 / 3),
    ],
)
def test_reasoning_steps(completion, expected):
    assert _one(REWARDS["reasoning_steps"])("q", completion, "ref") == pytest.approx(expected)


def test_reasoning_steps_max_steps_parameter():
    fn = _one(get_reward("reasoning_steps", max_steps=1))
    assert fn("q", "Step 1: a", "") == 1.0


def test_length_is_triangular_around_target():
    fn = _one(REWARDS["length"])
    assert fn("q", "x" * 200, "") == 1.0  # default target 200, width 200
    assert fn("q", "x" * 100, "") == pytest.approx(0.5)
    assert fn("q", "x" * 300, "") == pytest.approx(0.5)
    assert fn("q", "", "") == 0.0
    assert fn("q", "x" * 500, "") == 0.0
    short = _one(get_reward("length", target=4, width=8))
    assert short("q", "abcd", "") == 1.0
    assert short("q", "ab", "") == pytest.approx(0.75)
    assert short("q", "x" * 12, "") == 0.0
    assert _one(get_reward("length", target=0, width=10))("q", "x" * 5, "") == pytest.approx(0.5)
    with pytest.raises(ValueError):
        fn("q", "x", "", target=0)  # width defaults to target: must be > 0


def test_reference_overlap_is_rouge_l_over_100():
    fn = _one(REWARDS["reference_overlap"])
    assert fn("q", "the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert fn("q", "dog", "the cat sat") == 0.0
    assert fn("q", "", "the cat") == 0.0
    # LCS "the cat" (2 of 2 predicted, 2 of 4 reference words): F1 = 2 * 1 * 0.5 / 1.5
    assert fn("q", "the cat", "the cat sat down") == pytest.approx(2 / 3)


def test_combine_weighted_sum():
    good = "<think>Step 1: x</think><answer>4</answer>"
    assert _one(combine(["format"]))("q", good, "") == 1.0
    fn = _one(combine(["format", "reasoning_steps"], [2.0, 3.0]))
    assert fn("q", good, "") == pytest.approx(2.0 + 3.0 / 3)
    assert fn("q", "nothing", "") == 0.0
    with_params = _one(combine(["length"], params={"length": {"target": 2, "width": 2}}))
    assert with_params("q", "ab", "") == 1.0
    assert with_params("q", "abc", "") == pytest.approx(0.5)


def test_combine_rejects_bad_input():
    with pytest.raises(ValueError, match="known: .*format"):
        combine(["format", "no_such_reward"])
    with pytest.raises(ValueError, match="weights"):
        combine(["format", "length"], [1.0])
    with pytest.raises(ValueError, match="no rewards"):
        combine([])
    with pytest.raises(ValueError, match="not in"):
        combine(["format"], params={"length": {"target": 3}})
    with pytest.raises(ValueError, match="bad parameters"):
        combine(["length"], params={"length": {"tagret": 3}})


def test_batch_reward_sees_examples_metadata_and_returns_one_value_each():
    def answer_matches(examples, completions):
        return [float(c.strip() == ex.meta["answer"]) for ex, c in zip(examples, completions)]

    from raykd.rewards.registry import REWARDS as table
    from raykd.rewards.registry import register_reward

    register_reward("answer_matches", answer_matches)
    try:
        exs = [Example(f"u{i}", [], [], meta={"answer": str(i)}) for i in range(3)]
        fn = combine(["answer_matches", "format"], [2.0, 1.0])
        totals, parts = fn.score(exs, ["0", " 7", "2"])
        assert parts == {"answer_matches": [1.0, 0.0, 1.0], "format": [0.0, 0.0, 0.0]}
        assert totals == [2.0, 0.0, 2.0] == fn(exs, ["0", " 7", "2"])
        with pytest.raises(ValueError, match="already registered"):
            register_reward("answer_matches", answer_matches)
    finally:
        table.pop("answer_matches")


def test_per_completion_lifts_a_text_reward():
    batch = per_completion(format_reward)
    exs = [Example("a", [], []), Example("b", [], [])]
    assert batch(exs, ["<think>x</think><answer>1</answer>", "no"]) == [1.0, 0.0]
    with pytest.raises(ValueError):
        batch(exs, ["only one"])  # zip(strict=True): lengths must match
