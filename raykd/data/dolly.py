"""Loader for the Dolly-15k instruction schema (English Dolly and its multilingual versions).

Each record has string fields ``instruction``, ``context`` and ``response`` and optionally
``category`` (and ``id``).  The same schema is used by ``databricks/databricks-dolly-15k``
and by ``argilla/databricks-dolly-15k-curated-multilingual`` (splits ``en``, ``es``, ``de``,
``fr``), so one loader serves English and Spanish.  Files are JSON Lines (``.jsonl`` /
``.json``) or Parquet (``.parquet``, as the Hugging Face Hub serves the multilingual set), or
a Hub dataset by name: ``hub:databricks/databricks-dolly-15k`` (split ``train``) or
``hub:argilla/databricks-dolly-15k-curated-multilingual@es`` (``@split``), through
``datasets.load_dataset``.

The prompt is the instruction, followed by ``"\\n\\nContext:\\n" + context`` when the context
is non-empty; the reference is the response.  Both are stripped of surrounding whitespace.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raykd.data.files import read_lines, read_parquet
from raykd.data.records import TaskRecord

REQUIRED_FIELDS: tuple[str, ...] = ("instruction", "response")
OPTIONAL_FIELDS: tuple[str, ...] = ("context", "category")


class DollyFormatError(ValueError):
    """A record of a Dolly-schema file is malformed; the message names file and line/row."""


def dolly_prompt(instruction: str, context: str = "") -> str:
    """The user turn for a Dolly record."""
    instruction, context = instruction.strip(), context.strip()
    return f"{instruction}\n\nContext:\n{context}" if context else instruction


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """``(location, parsed object)`` per non-blank line; location is ``"path:line N"``."""
    for lineno, line in read_lines(path):  # DataFileError for long lines, non-UTF-8 bytes
        if not line.strip():
            continue
        where = f"{path}:line {lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            raise DollyFormatError(
                f"{where}: invalid JSON ({err.msg} at column {err.colno})"
            ) from None


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    """``(location, row dict)`` per row; location is ``"path:row N"`` (1-based)."""
    table = read_parquet(path)
    missing = [f for f in REQUIRED_FIELDS if f not in table.column_names]
    if missing:
        raise DollyFormatError(f"{path}: missing column(s) {missing}; has {table.column_names}")
    for index, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}:row {index}", row


HUB_PREFIX = "hub:"


def hub_name(path: str | Path) -> tuple[str, str] | None:
    """``(dataset, split)`` of a ``hub:NAME[@SPLIT]`` path (split default ``train``), else None."""
    text = str(path)
    if not text.startswith(HUB_PREFIX):
        return None
    name, _, split = text[len(HUB_PREFIX) :].partition("@")
    return name, split or "train"


def _iter_hub(name: str, split: str) -> Iterator[tuple[str, Any]]:
    """``(location, row dict)`` per row of a Hub dataset split (``datasets`` caches it)."""
    from datasets import load_dataset  # a dependency; imported lazily

    for index, row in enumerate(load_dataset(name, split=split), start=1):
        yield f"{HUB_PREFIX}{name}@{split}:row {index}", row


def _field(obj: dict, key: str, where: str, required: bool) -> str:
    if key not in obj or (obj[key] is None and not required):
        if required:
            raise DollyFormatError(f"{where}: missing required key {key!r}")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise DollyFormatError(f"{where}: key {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DollyFormatError(f"{where}: key {key!r} is empty")
    return value


def _record_id(obj: dict, where: str) -> str | None:
    value = obj.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DollyFormatError(f"{where}: key 'id' must be a string or integer")
    return str(value)


def load_dolly(
    path: str | Path, *, limit: int | None = None, name: str | None = None
) -> list[TaskRecord]:
    """Read a Dolly-schema JSONL or Parquet file into :class:`TaskRecord` objects.

    Args:
        path: ``.jsonl``/``.json`` (one JSON object per line, blank lines ignored),
            ``.parquet``, or ``hub:NAME[@SPLIT]`` (a Hub dataset in this schema).
        limit: Read at most this many records (in file order).
        name: Prefix of the uids; defaults to the file stem.

    Returns:
        Records with uid ``"{name}/{id}"`` when rows carry an ``id``, else
        ``"{name}/{line or row number}"``; ``meta`` holds ``category`` (possibly ``""``),
        ``has_context`` and ``source`` (``"path:line N"``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DollyFormatError: invalid JSON, a line that is not an object, a missing or empty
            ``instruction``/``response``, a non-string field or a duplicate uid; the message
            names the file and the 1-based line (JSONL) or row (Parquet).
        DataFileError: a line over :data:`~raykd.data.files.MAX_LINE_BYTES`, bytes that are
            not UTF-8, or an unreadable Parquet file; the message names the file (and line).
    """
    hub = hub_name(path)
    if hub is not None:
        rows = _iter_hub(*hub)
        prefix = name or f"{hub[0].rsplit('/', 1)[-1]}-{hub[1]}"
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Dolly file not found: {path}")
        rows = _iter_parquet(path) if path.suffix == ".parquet" else _iter_jsonl(path)
        prefix = name or path.stem
    records: list[TaskRecord] = []
    seen: set[str] = set()
    for where, obj in rows:
        if limit is not None and len(records) >= limit:
            break
        if not isinstance(obj, dict):
            raise DollyFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        instruction = _field(obj, "instruction", where, required=True)
        response = _field(obj, "response", where, required=True)
        context = _field(obj, "context", where, required=False)
        category = _field(obj, "category", where, required=False)
        key = _record_id(obj, where) or where.rsplit(" ", 1)[1]
        uid = f"{prefix}/{key}"
        if uid in seen:
            raise DollyFormatError(f"{where}: duplicate id {key!r}")
        seen.add(uid)
        records.append(
            TaskRecord(
                uid=uid,
                prompt=dolly_prompt(instruction, context),
                reference=response.strip(),
                meta={"category": category, "has_context": bool(context.strip()), "source": where},
            )
        )
    return records
