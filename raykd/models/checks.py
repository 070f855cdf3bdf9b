"""Checks of a model directory that read only file headers, so bad files fail with a message
naming them instead of a library error from deep inside ``from_pretrained``.

* :func:`check_safetensors`: every ``*.safetensors`` file has a readable header and is as long
  as the header says (a truncated download or copy is caught before any tensor is read);
  shards an index names exist.
* :func:`check_tokenizer_files`: the directory holds tokenizer files at all (transformers
  otherwise asks to install sentencepiece).
* :func:`config_vocab_size`: the vocabulary size a model's ``config.json`` declares.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

__all__ = [
    "TOKENIZER_FILES",
    "ModelFileError",
    "check_safetensors",
    "check_tokenizer_files",
    "config_vocab_size",
]

#: Files any one of which lets transformers build a tokenizer.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the JSON header


class ModelFileError(OSError):
    """A model file that is missing, truncated or not in its format; the message names it."""


def _check_one(path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelFileError(
                f"{path} is truncated or not a safetensors file: {size} bytes, shorter than "
                "the 8-byte header length"
            )
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise ModelFileError(
                f"{path} is truncated or not a safetensors file: its header length says "
                f"{n} bytes, the file has {size} bytes"
            )
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelFileError(
                f"{path} is corrupt: its header is not valid JSON ({err})"
            ) from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} is corrupt: its header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise ModelFileError(
                f"{path} is corrupt: tensor {name!r} has no valid data_offsets"
            ) from None
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "corrupt"
        raise ModelFileError(
            f"{path} is {what}: its header describes {8 + n + end} bytes, the file has {size} "
            "bytes (an interrupted download or copy?); replace the file"
        )


def check_safetensors(directory: str | os.PathLike[str]) -> None:
    """Raise :class:`ModelFileError` naming the file if a ``*.safetensors`` file of
    ``directory`` is truncated or has a corrupt header, or a shard listed in
    ``model.safetensors.index.json`` is missing. Reads headers only."""
    root = Path(directory)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ModelFileError(f"{index} is corrupt: no readable weight_map") from None
        missing = sorted(s for s in shards if not (root / s).is_file())
        if missing:
            raise ModelFileError(f"{index} names shards that do not exist: {missing}")
    for path in sorted(root.glob("*.safetensors")):
        _check_one(path)


def check_tokenizer_files(directory: str | os.PathLike[str]) -> None:
    """Raise :class:`ModelFileError` if ``directory`` holds none of :data:`TOKENIZER_FILES`."""
    root = Path(directory)
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFileError(
            f"{root} has no tokenizer files ({' / '.join(TOKENIZER_FILES)}); copy the "
            "tokenizer of the model into it (tokenizer.save_pretrained)"
        )


def config_vocab_size(name_or_path: str | os.PathLike[str]) -> int | None:
    """``vocab_size`` declared by a model's ``config.json`` (a local directory's file, else the
    Hub's, through ``AutoConfig``); a multimodal config's ``text_config`` counts; None if the
    config declares none."""
    config_file = Path(name_or_path) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
        return int(size) if size else None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(os.fspath(name_or_path))
    size = getattr(config.get_text_config(), "vocab_size", None)
    return int(size) if size else None
