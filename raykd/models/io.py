"""Saving models atomically, and measuring them.

A directory written by :func:`save_model` is either absent, the complete old version or the
complete new version: the model is written to a temporary sibling directory which is then
renamed into place (a rename within one filesystem is atomic).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["count_parameters", "model_size_mb", "publish_dir", "save_model", "staging_dir"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _sibling(target: Path, tag: str) -> Path:
    """A unique hidden path next to ``target`` (same filesystem, so renames are atomic)."""
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def staging_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh empty directory next to ``target``; it is deleted if still there on exit."""
    target = Path(target).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(staged: Path, target: str | os.PathLike[str], replace: bool) -> bool:
    """Move the complete directory ``staged`` to ``target``.

    If ``target`` exists and ``replace`` is false, nothing is moved and False is returned
    (another writer won a race: its result is used). With ``replace``, the old directory is
    renamed aside, the new one renamed in, and the old one deleted; if the second rename
    fails the old directory is put back. Returns True when ``staged`` became ``target``.
    """
    target = Path(target).expanduser().absolute()
    if not replace or not target.exists():
        try:
            os.rename(staged, target)  # fails if target is a non-empty directory or a file
            return True
        except OSError:
            if not target.exists():
                raise
            if not replace:
                return False
    old = _sibling(target, "old")
    os.rename(target, old)
    try:
        os.rename(staged, target)
    except BaseException:
        os.rename(old, target)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
    return True


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    path: str | os.PathLike[str],
) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` to ``path`` atomically; return the path.

    An existing directory at ``path`` is replaced as a whole, never merged into.
    """
    target = Path(path).expanduser().absolute()
    with staging_dir(target) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        publish_dir(tmp, target, replace=True)
    return target


def _numel(param: nn.Parameter) -> int:
    # ZeRO-3 partitions parameters in place and records the full size in ds_numel.
    return int(getattr(param, "ds_numel", param.numel()))


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: ``total`` and ``non_embedding`` (total minus token embeddings and LM head).

    Shared tensors (tied input/output embeddings) are counted once.
    """
    params = {id(p): p for p in model.parameters()}  # parameters() already de-duplicates
    total = sum(_numel(p) for p in params.values())
    embedding_ids: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and id(weight) in params:
            embedding_ids.add(id(weight))
    embedding = sum(_numel(params[i]) for i in embedding_ids)
    return {"total": total, "non_embedding": total - embedding}


def model_size_mb(path: str | os.PathLike[str]) -> float:
    """Size in MiB (2**20 bytes) of the weight files in a model directory, or of one file.

    Weight files are ``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth`` and ``*.gguf``
    anywhere under the directory; config and tokenizer files are not counted.
    """
    root = Path(path).expanduser()
    if root.is_file():
        return root.stat().st_size / 2**20
    if not root.is_dir():
        raise FileNotFoundError(f"no model file or directory at {str(root)!r}")
    size = sum(
        f.stat().st_size
        for f in root.rglob("*")
        if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES)
    )
    return size / 2**20
