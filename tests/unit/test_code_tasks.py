"""Code tasks with tests: generated function problems, HumanEval from the wheel, the
codeforces-cots-like JSONL schema; and their registration as tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raykd.batch import Example
from raykd.data import TASKS, load_task
from raykd.data.code_problems import CodeProblemFormatError, load_code_problems, load_humaneval
from raykd.data.function_tasks import (
    FAMILIES,
    generate_function_tasks,
    split_function_tasks,
)
from raykd.rewards import get_reward

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # missing sandbox layers
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def problems():
    return generate_function_tasks()


def _examples(records):
    return [Example(r.uid, [], [], meta=r.meta) for r in records]


def test_generated_problems_are_deterministic_distinct_and_exact(problems):
    assert [r.uid for r in generate_function_tasks()] == [r.uid for r in problems]
    assert len(problems) >= 400 and len({r.prompt for r in problems}) == len(problems)
    assert len({r.uid for r in problems}) == len(problems)
    assert {r.meta["family"] for r in problems} == set(FAMILIES)
    for r in problems:
        name = r.meta["entry_point"]
        assert r.prompt.startswith(f"Write a Python function `{name}(")
        assert r.reference.startswith(f"def {name}(") and len(r.meta["tests"]) >= 3
        assert all(t.startswith(f"assert {name}(") for t in r.meta["tests"])
    add = next(r for r in problems if r.meta["family"] == "add")
    c = int(add.meta["name"].split("_")[1])
    assert f"plus {c}" in add.prompt and f"return x + {c}" in add.reference


def test_references_pass_their_tests_and_wrong_answers_do_not(problems):
    one_per_family = list({r.meta["family"]: r for r in problems}.values())
    reward = get_reward("execution", timeout=5.0, mode="all_or_nothing")
    assert reward(_examples(one_per_family), [r.reference for r in one_per_family]) == [1.0] * len(
        one_per_family
    )
    stub = [f"def {r.meta['name']}(*args):\n    return None" for r in one_per_family]
    assert max(reward(_examples(one_per_family), stub)) < 1.0


def test_splits_hold_out_problems_or_whole_families(problems):
    train, held = split_function_tasks(problems, 0.25, seed=0)
    assert len(held) == round(0.25 * len(problems))
    assert not {r.uid for r in train} & {r.uid for r in held}
    train, held = split_function_tasks(problems, 0.2, seed=0, by_family=True)
    assert not {r.meta["family"] for r in train} & {r.meta["family"] for r in held}
    assert len(held) >= 0.2 * len(problems)


def test_humaneval_from_the_wheel():
    records = load_humaneval()
    assert len(records) == 164
    first = records[0]
    assert first.uid == "HumanEval/0" and first.meta["entry_point"] == "has_close_elements"
    assert "def has_close_elements" in first.prompt and first.prompt.endswith("```")
    assert first.meta["tests"][0].rstrip().endswith("check(has_close_elements)")
    sample = records[::41]
    got = get_reward("execution", timeout=10.0)(_examples(sample), [r.reference for r in sample])
    assert got == [1.0] * len(sample)


def test_codeforces_schema_fixture():
    records = load_code_problems(FIXTURES / "codeforces_cots.jsonl")
    by_id = {r.uid.split("/")[-1]: r for r in records}
    assert set(by_id) == {"4A", "71A", "fn1", "nt"}
    wm = by_id["4A"]
    assert wm.meta["format"] == "think_answer" and wm.reference.startswith("<think>")
    assert wm.meta["tests"][0] == {"input": "8\n", "output": "YES"}
    assert by_id["71A"].meta["tests"][0]["output"] == "word\nl10n\n"  # from `examples`
    assert by_id["fn1"].meta == {"tests": ["assert double(2) == 4", "assert double(-1) == -2"],
                                 "format": "code"}  # fmt: skip
    assert by_id["nt"].meta["tests"] == []
    with_tests = [by_id[k] for k in ("4A", "71A", "fn1")]
    reward = get_reward("execution", timeout=5.0)
    assert reward(_examples(with_tests), [r.reference for r in with_tests]) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", "line 2: invalid JSON"),
        (json.dumps({"reasoning": "r"}), "line 2: no problem statement"),
        (json.dumps({"prompt": "p", "tests": [{"input": "1"}]}), "line 2.*'input' and 'output'"),
        (json.dumps({"prompt": "p", "tests": "x"}), "line 2.*not a list"),
        (json.dumps({"prompt": "p", "tests": [3]}), "line 2.*a test is a string"),
        (json.dumps({"id": 1, "prompt": "q"}), "line 2: duplicate id"),
    ],
)
def test_codeforces_schema_errors_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "cf.jsonl"
    path.write_text(json.dumps({"id": 1, "prompt": "p"}) + "\n" + line + "\n")
    with pytest.raises(CodeProblemFormatError, match=match):
        load_code_problems(path)
    with pytest.raises(FileNotFoundError):
        load_code_problems(tmp_path / "missing.jsonl")


@pytest.fixture(scope="module")
def tokenizer():
    from raykd.models import build_tiny_tokenizer

    return build_tiny_tokenizer()


def test_tasks_registered_and_tests_reach_the_examples(tokenizer):
    assert {"function_tasks", "function_tasks_by_family", "humaneval", "codeforces"} <= set(TASKS)
    data = load_task("function_tasks", tokenizer, max_length=512, eval_fraction=0.25)
    assert data.kind == "code" and len(data.eval) >= 96
    ex = data.eval[0]
    assert ex.meta["tests"] and ex.meta["entry_point"] in ex.prompt_text
    assert not {e.uid for e in data.train} & {e.uid for e in data.eval}
    he = load_task("humaneval", tokenizer, max_length=4096, num_eval=5)
    assert he.train == [] and len(he.eval) == 5 and he.stats["found_eval"] == 164
    cf = load_task("codeforces", tokenizer, path=FIXTURES / "codeforces_cots.jsonl",
                   max_length=2048, eval_fraction=0.25)  # fmt: skip
    assert len(cf.train) + len(cf.eval) == 4 and cf.stats["without_tests"] == 1
