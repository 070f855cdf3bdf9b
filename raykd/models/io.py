"""Saving models atomically, and measuring them.

A directory written by :func:`save_model` is either absent, the complete old version or the
complete new version (:mod:`raykd.atomic`: staged in a sibling directory, renamed into place).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from raykd.atomic import publish_dir, staging_dir

__all__ = ["count_parameters", "model_size_mb", "save_model"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


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
