"""Reading data files line by line, with errors that name the file and the line.

Every JSON Lines reader of :mod:`raykd.data` goes through :func:`read_lines`: it reads bytes,
refuses a line longer than ``max_line_bytes`` by its length (before the line is decoded, parsed
or tokenised; at most ``max_line_bytes + 2`` bytes of it are ever read), and decodes UTF-8
itself, so bad input fails with ``path:line N: ...`` instead of a bare ``UnicodeDecodeError``
from deep inside a loop. :func:`read_parquet` does the same for a Parquet file that is not one.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: The longest line (bytes, without its line break) a JSON Lines data file may hold: 16 MiB.
#: Dolly records are kilobytes and a Codeforces record with a full R1 answer and its tests
#: well under a megabyte; a longer line is almost surely not a record (a dump, a binary file).
MAX_LINE_BYTES = 16 * 2**20


class DataFileError(ValueError):
    """A data file that cannot be read as text records; the message names the file and line."""


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def read_lines(
    path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[tuple[int, str]]:
    """``(1-based line number, text)`` for every line of a UTF-8 text file (``.gz``: gzip).

    The text keeps its line break; blank lines are yielded too (callers skip them). A UTF-8
    byte-order mark at the start of the file is dropped.

    Raises:
        DataFileError: a line longer than ``max_line_bytes`` bytes (not counting its line
            break): ``"<path>:line N: line is longer than the limit of M bytes ..."``; bytes
            that are not UTF-8: ``"<path>:line N: not valid UTF-8 (byte 0xff at column C)"``;
            a gzip file that ends early or is not gzip.
    """
    path = Path(path)
    lineno = 0
    with _open(path) as fh:
        while True:
            try:
                raw = fh.readline(max_line_bytes + 2)  # the longest allowed line and "\r\n"
            except (EOFError, OSError) as err:  # a truncated or corrupt .gz
                raise DataFileError(f"{path}:line {lineno + 1}: cannot read: {err}") from None
            if not raw:
                return
            lineno += 1
            content = raw[:-1] if raw.endswith(b"\n") else raw
            if len(content[:-1] if content.endswith(b"\r") else content) > max_line_bytes:
                raise DataFileError(
                    f"{path}:line {lineno}: line is longer than the limit of {max_line_bytes} "
                    "bytes; refusing to parse it (a data file holds one record per line)"
                )
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataFileError(
                    f"{path}:line {lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at "
                    f"column {err.start + 1}); save the file as UTF-8"
                ) from None
            yield lineno, text


def read_parquet(path: str | Path) -> Any:
    """The ``pyarrow.Table`` of a Parquet file; :class:`DataFileError` naming the path if the
    file is not readable Parquet (truncated, or another format with a ``.parquet`` name)."""
    import pyarrow as pa  # installed with ``datasets``; imported lazily
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataFileError(f"{path}: not a readable Parquet file ({err})") from None
