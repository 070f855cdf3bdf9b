"""Bad inputs fail fast with a message naming the culprit: non-UTF-8 bytes and over-long lines
in data files (path and line), truncated safetensors (the file), a model directory without a
tokenizer, a student whose vocabulary is not the teacher's (both sizes), an empty dataset or
one whose every example is too long (the counts); non-finite steps (messages, the optimizer
that skips)."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from raykd.config import load_config
from raykd.data import (
    MAX_LINE_BYTES,
    DataFileError,
    EmptyDatasetError,
    load_dolly,
    load_task,
    read_lines,
)
from raykd.data.code_problems import load_code_problems, load_humaneval
from raykd.models import (
    ModelFileError,
    build_tiny_model,
    build_tiny_tokenizer,
    load_model,
    load_tokenizer,
    save_model,
)
from raykd.pipeline.preflight import PreflightError, check_run
from raykd.roles.step_guard import GuardedAdamW, NonFiniteTrainingError, StepGuard

RECORD = {"instruction": "Say hi.", "context": "", "response": "Hi."}


HUMANEVAL = json.dumps({"task_id": "t/0", "prompt": "def f():\n", "entry_point": "f",
                        "canonical_solution": "    return 1\n", "test": "assert f() == 1"}
                       ).encode()  # fmt: skip


def _jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _good() -> bytes:
    return json.dumps(RECORD).encode()


# ---- data files ---------------------------------------------------------------------------
def test_non_utf8_bytes_name_the_path_line_and_byte(tmp_path):
    bad = b'{"instruction": "caf\xe9", "response": "x"}'  # Latin-1 e-acute
    path = _jsonl(tmp_path / "d.jsonl", [_good(), b"", bad])
    with pytest.raises(DataFileError) as err:
        load_dolly(path)
    assert str(err.value) == (
        f"{path}:line 3: not valid UTF-8 (byte 0xe9 at column 21); save the file as UTF-8"
    )
    problems = _jsonl(tmp_path / "p.jsonl", [b'{"prompt": "x"}', b'{"prompt": "\xff"}'])
    with pytest.raises(DataFileError, match=rf"^{problems}:line 2: not valid UTF-8 \(byte 0xff"):
        load_code_problems(problems)
    gz = tmp_path / "h.jsonl.gz"
    gz.write_bytes(gzip.compress(HUMANEVAL + b"\n\xc3\x28\n"))
    with pytest.raises(DataFileError, match=rf"^{gz}:line 2: not valid UTF-8 \(byte 0xc3 at "):
        load_humaneval(gz)


def test_a_25_mb_line_is_refused_by_its_length_before_parsing(tmp_path):
    huge = json.dumps({**RECORD, "instruction": "x" * 25_000_000}).encode()  # valid JSON
    path = _jsonl(tmp_path / "d.jsonl", [_good(), huge])
    with pytest.raises(DataFileError) as err:
        load_dolly(path)
    assert str(err.value) == (
        f"{path}:line 2: line is longer than the limit of {MAX_LINE_BYTES} bytes; refusing to "
        "parse it (a data file holds one record per line)"
    )
    assert MAX_LINE_BYTES == 16 * 2**20


def test_line_limit_boundary_and_bom(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"abcd\r\nabcde\n")
    lines = read_lines(path, max_line_bytes=4)
    assert next(lines) == (1, "abcd\r\n")  # exactly the limit; the line break kept
    with pytest.raises(
        DataFileError, match=rf"^{path}:line 2: line is longer than the limit of 4 "
    ):
        next(lines)
    path.write_bytes(b"\xef\xbb\xbf" + _good() + b"\n")  # a UTF-8 byte-order mark
    assert load_dolly(path)[0].prompt == "Say hi."


def test_truncated_gzip_names_the_file(tmp_path):
    gz = tmp_path / "h.jsonl.gz"
    gz.write_bytes(gzip.compress(HUMANEVAL + b"\n" + HUMANEVAL + b"\n")[:-12])
    with pytest.raises(DataFileError) as err:
        load_humaneval(gz)
    assert str(err.value) == (
        f"{gz}:line 2: cannot read: Compressed file ended before the end-of-stream marker was "
        "reached"
    )


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tiny_tokenizer()


def test_empty_dataset_is_refused_with_the_path(tmp_path, tiny_tokenizer):
    path = _jsonl(tmp_path / "empty.jsonl", [b"", b"  "])
    with pytest.raises(EmptyDatasetError) as err:
        load_task("dolly", tiny_tokenizer, path=path)
    assert str(err.value) == f"task 'dolly' ({path}): no examples found (0 records)"


def test_every_example_too_long_is_refused_with_the_counts(tmp_path, tiny_tokenizer):
    lines = [json.dumps({**RECORD, "response": f"Answer number {i}."}).encode() for i in range(5)]
    path = _jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(EmptyDatasetError) as err:
        load_task("dolly", tiny_tokenizer, path=path, max_length=8, eval_fraction=0.2)
    assert str(err.value) == (
        f"task 'dolly' ({path}): all examples are longer than data.max_length=8 tokens "
        "(5 found, 5 dropped for length); raise data.max_length or use shorter examples"
    )
    data = load_task("dolly", tiny_tokenizer, path=path, max_length=512, eval_fraction=0.2)
    assert data.stats["found"] == 5 and data.stats["dropped"] == 0


# ---- model directories --------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    model = build_tiny_model(tiny_tokenizer, seed=0, num_layers=1, hidden_size=16)
    return save_model(model, tiny_tokenizer, tmp_path_factory.mktemp("m") / "tiny")


def test_truncated_safetensors_names_the_file(tmp_path, model_dir):
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    weights = copy / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    with pytest.raises(ModelFileError) as err:
        load_model(copy)
    assert str(err.value) == (
        f"{weights} is truncated: its header describes {size} bytes, the file has {size // 2} "
        "bytes (an interrupted download or copy?); replace the file"
    )
    weights.write_bytes(b"\x05")
    with pytest.raises(ModelFileError, match=rf"^{weights} is truncated or not a safetensors "):
        load_model(copy)


def test_missing_shard_of_an_index_is_named(tmp_path, model_dir):
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFileError) as err:
        load_model(copy)
    assert str(err.value) == (
        f"{copy / 'model.safetensors.index.json'} names shards that do not exist: "
        "['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']"
    )


def test_directory_without_tokenizer_says_so(tmp_path, model_dir):
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).unlink()
    with pytest.raises(ModelFileError) as err:
        load_tokenizer(copy)
    assert str(err.value) == (
        f"{copy} has no tokenizer files (tokenizer.json / tokenizer_config.json / "
        "tokenizer.model / vocab.json / vocab.txt / spiece.model / sentencepiece.bpe.model); "
        "copy the tokenizer of the model into it (tokenizer.save_pretrained)"
    )


# ---- preflight: vocabularies ----------------------------------------------------------------
def _cfg(tmp_path: Path, teacher: Path, student: dict) -> object:
    yaml = tmp_path / "run.yaml"
    yaml.write_text(json.dumps({"teacher": {"model": str(teacher)}, "student": student}))
    return load_config(yaml)


def test_student_with_another_vocabulary_is_refused_naming_both_sizes(tmp_path, model_dir):
    small = {"model_type": "llama", "vocab_size": 300, "hidden_size": 32,
             "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}  # fmt: skip
    cfg = _cfg(tmp_path, model_dir, {"init": "config", "model_config": small})
    with pytest.raises(PreflightError) as err:
        check_run(cfg, str(model_dir))
    assert str(err.value) == (
        f"vocabulary mismatch: student.model_config has vocab_size 300, the teacher "
        f"({model_dir}, {model_dir}) has vocab_size 259; distillation needs a student with the "
        "teacher's tokenizer and vocabulary"
    )
    other = tmp_path / "other"
    tok = build_tiny_tokenizer()
    save_model(build_tiny_model(320, seed=0, num_layers=1, hidden_size=16), tok, other)
    cfg = _cfg(tmp_path, model_dir, {"init": "pretrained", "model": str(other)})
    with pytest.raises(PreflightError, match=rf"^vocabulary mismatch: student.model={other} has "
                       r"vocab_size 320, the teacher .* has vocab_size 259;"):  # fmt: skip
        check_run(cfg, str(model_dir))
    same = {**small, "vocab_size": 259}
    check_run(_cfg(tmp_path, model_dir, {"init": "config", "model_config": same}), str(model_dir))
    check_run(_cfg(tmp_path, model_dir, {"init": "from_teacher"}), str(model_dir))


# ---- non-finite steps -----------------------------------------------------------------------
def test_step_guard_warns_each_skip_and_stops_after_max(caplog):
    guard = StepGuard(max_bad_steps=2, rank=0)
    with caplog.at_level(logging.WARNING, logger="raykd.learner"):
        guard.record(7, True, {"loss": float("nan"), "grad_norm": float("nan")})
        guard.record(8, False, {"loss": 1.0})
        guard.record(9, True, {"loss": float("inf")})
        with pytest.raises(NonFiniteTrainingError) as err:
            guard.record(10, True, {"loss": float("inf"), "grad_norm": float("inf")})
    assert [r.getMessage() for r in caplog.records] == [
        "learner: step 7 skipped: non-finite loss or gradient (rank 0: loss nan, grad norm nan); "
        "weights and optimizer state unchanged (1 of learner.max_bad_steps=2 in a row)",
        "learner: step 9 skipped: non-finite loss or gradient (rank 0: loss inf, grad norm "
        "None); weights and optimizer state unchanged (1 of learner.max_bad_steps=2 in a row)",
        "learner: step 10 skipped: non-finite loss or gradient (rank 0: loss inf, grad norm "
        "inf); weights and optimizer state unchanged (2 of learner.max_bad_steps=2 in a row)",
    ]
    assert str(err.value) == (
        "learner: 2 consecutive steps (9-10) had a non-finite loss or gradient (last: rank 0: "
        "loss inf, grad norm inf; learner.max_bad_steps=2); stopping. None of them changed the "
        "weights; no checkpoint of this stage was written yet (pipeline.checkpoint_every), so a "
        "rerun starts the stage from its input model. Lower learner.lr or check the data and "
        "loss settings first."
    )
    with pytest.raises(ValueError, match=r"^learner.max_bad_steps must be >= 1, got 0$"):
        StepGuard(max_bad_steps=0)


def test_guarded_adamw_leaves_weights_and_state_alone_while_skipping():
    w = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([w], lr=0.1, weight_decay=0.1)
    w.grad = torch.full((3,), 0.5)
    opt.step()
    moved, state = w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()}
    w.grad = torch.full((3,), float("nan"))
    opt.skip = True
    assert opt.overflow is True
    opt.step()
    assert torch.equal(w.detach(), moved)
    assert all(torch.equal(opt.state[w][k], v) for k, v in state.items())
    opt.skip = False
    assert opt.overflow is False


def test_cli_prints_the_stop_in_one_line(tmp_path, monkeypatch, capsys):
    import raykd.pipeline.run
    from raykd.cli import main

    def stop(cfg):
        raise NonFiniteTrainingError("learner: 3 consecutive steps (4-6) ... stopping.")

    monkeypatch.setattr(raykd.pipeline.run, "run_pipeline", stop)
    conf = tmp_path / "run.yaml"
    conf.write_text(f"run:\n  output_dir: {tmp_path}\n")
    assert main(["run", str(conf)]) == 1
    assert capsys.readouterr().err == "raykd: learner: 3 consecutive steps (4-6) ... stopping.\n"
