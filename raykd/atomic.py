"""Atomic writes: a reader (or a resumed run) sees the old complete file or directory, or the
new complete one, never a half-written one.

* Files: :func:`atomic_write` writes a temporary sibling, fsyncs it and ``os.replace``-s it in.
* Directories: the writer fills a staging directory (:func:`staging_dir`, or a fixed sibling
  path when several processes write one directory together, as DeepSpeed ranks do), then
  :func:`publish_dir` renames it into place. Replacing an existing directory renames the old
  one aside to ``<name>.old`` first; a crash between the two renames leaves ``.old``, which
  :func:`recover_dir` puts back. This is the one directory mechanism of raykd: models,
  checkpoints and converted teachers all go through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "jsonable",
    "publish_dir",
    "recover_dir",
    "staging_dir",
]


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory + ``os.replace``."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; run files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=jsonable))


def jsonable(obj: Any):
    """``json.dumps(default=)`` hook for tensors/numpy scalars and paths."""
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _old(target: Path) -> Path:
    return target.with_name(target.name + ".old")


@contextlib.contextmanager
def staging_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh empty directory next to ``target`` (same filesystem, so the final rename
    is atomic); it is deleted if still there on exit (i.e. not published)."""
    target = Path(target).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(staged: Path, target: str | os.PathLike[str], *, replace: bool = True) -> bool:
    """Move the complete directory ``staged`` to ``target``; True when it became ``target``.

    If ``target`` exists and ``replace`` is false, nothing moves and False is returned (another
    writer won a race: its result is used). With ``replace`` the old directory is renamed to
    ``<target>.old``, the new one renamed in, and the old one deleted; if the second rename
    fails the old one is put back.
    """
    target = Path(target).expanduser().absolute()
    staged = Path(staged)
    if not target.exists():
        try:
            os.rename(staged, target)
            return True
        except OSError:
            if not target.exists():
                raise
    if not replace:
        return False
    old = _old(target)
    if old.exists():
        shutil.rmtree(old)
    os.rename(target, old)
    try:
        os.rename(staged, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return True


def recover_dir(target: str | os.PathLike[str]) -> None:
    """Undo a :func:`publish_dir` cut between its two renames (``.old`` back in place)."""
    target = Path(target)
    old = _old(target)
    if not target.exists() and old.exists():
        os.replace(old, target)
