"""Checking quantization settings against a model's shape, before any weight is loaded.

Weight-only quantization here splits the input dimension of every decoder-layer ``Linear``
into groups of ``group_size`` columns, each with its own scale and zero point, and packs the
integer codes into int32 words (the GPTQ checkpoint layout). That constrains the settings:

* ``bits`` is 3, 4 or 8 (what raykd supports and tests; GPTQModel's CPU kernels take 2..8);
* ``group_size`` is ``-1`` (one group per row: per-channel) or one of the sizes the GPTQ
  CPU kernels accept (16, 32, ..., 1024), and it must divide the input size of every
  quantized layer: ``hidden_size`` (q/k/v/gate/up), ``num_attention_heads * head_dim``
  (o_proj) and ``intermediate_size`` (down_proj);
* every input and output size is a multiple of ``32 / gcd(32, bits)`` (8 for 4-bit, 4 for
  8-bit, 32 for 3-bit), so that codes and zero points fill whole int32 words.

:func:`check_quant_config` works on a plain ``config.json`` dict (the pipeline calls it before any
model loads); :func:`check_quant_settings` also takes a bare hidden size, a transformers config,
a model or a model directory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "METHODS",
    "SUPPORTED_BITS",
    "VLLM_GPTQ_BITS",
    "SUPPORTED_GROUP_SIZES",
    "check_quant_config",
    "check_quant_settings",
    "linear_dims",
    "pack_multiple",
]

#: Quantization methods :func:`raykd.quantize.quantize` implements.
METHODS = ("gptq", "rtn")
#: Bit widths raykd supports.
SUPPORTED_BITS = (3, 4, 8)
#: Bits vLLM's GPTQ path loads (symmetric codes only; its CPU kernel takes 4-bit alone)
VLLM_GPTQ_BITS = (4, 8)
#: Group sizes the GPTQ CPU kernels load (``-1``: one group spanning the whole input row).
SUPPORTED_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)


def pack_multiple(bits: int) -> int:
    """How many ``bits``-bit codes fill a whole number of int32 words (8 for 4-bit, 32 for 3-bit)."""
    return 32 // math.gcd(32, bits)


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language-model part of a config (``text_config`` of multimodal models)."""
    inner = config.get("text_config")
    if isinstance(inner, Mapping) and "hidden_size" in inner and "hidden_size" not in config:
        return inner
    return config


def linear_dims(config: Mapping[str, Any]) -> dict[str, int]:
    """Feature sizes of a decoder layer's linears, from a ``config.json`` dict.

    Returns ``hidden_size``, ``intermediate_size``, ``attention_size`` (``num_attention_heads
    * head_dim``, the input of o_proj) and ``kv_size`` (``num_key_value_heads * head_dim``, the
    output of k/v_proj); the last three only when the config names them.
    """
    config = _text_config(config)
    if "hidden_size" not in config:
        raise ValueError(f"model config has no 'hidden_size'; keys: {sorted(config)}")
    hidden = int(config["hidden_size"])
    dims = {"hidden_size": hidden}
    if config.get("intermediate_size"):
        dims["intermediate_size"] = int(config["intermediate_size"])
    heads = config.get("num_attention_heads")
    if heads:
        head_dim = int(config.get("head_dim") or hidden // int(heads))
        dims["attention_size"] = int(heads) * head_dim
        kv_heads = config.get("num_key_value_heads") or heads
        dims["kv_size"] = int(kv_heads) * head_dim
    return dims


def _check_scalars(bits: Any, group_size: Any, method: str | None) -> None:
    if method is not None and method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; choose one of {', '.join(METHODS)}")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        choices = ", ".join(map(str, SUPPORTED_BITS))
        raise ValueError(f"bits={bits!r} is not supported; choose one of {choices}")
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or group_size not in SUPPORTED_GROUP_SIZES
    ):
        raise ValueError(
            f"group_size={group_size!r} is not supported: use -1 (per channel) or one of "
            f"{', '.join(map(str, SUPPORTED_GROUP_SIZES[1:]))} (the sizes the GPTQ kernels load)"
        )


def check_quant_config(
    config: Mapping[str, Any], bits: int, group_size: int, method: str | None = None
) -> dict[str, int]:
    """Raise :class:`ValueError` naming the bad setting unless ``bits``/``group_size`` fit ``config``.

    ``config`` is a ``config.json`` dict; nothing is loaded. Returns :func:`linear_dims`.
    """
    _check_scalars(bits, group_size, method)
    dims = linear_dims(config)
    inputs = [k for k in ("hidden_size", "attention_size", "intermediate_size") if k in dims]
    if group_size != -1:
        for key in inputs:
            if dims[key] % group_size:
                raise ValueError(
                    f"group_size={group_size} does not divide {key}={dims[key]}: every input "
                    f"row of a quantized layer must split into whole groups"
                )
    multiple = pack_multiple(bits)
    for key, size in dims.items():
        if size % multiple:
            raise ValueError(
                f"bits={bits} needs every layer size to be a multiple of {multiple} (whole int32 "
                f"words of {bits}-bit codes), but {key}={size}"
            )
    return dims


def _as_config_dict(model: Any) -> Mapping[str, Any]:
    if isinstance(model, Mapping):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = Path(model).expanduser()
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no model config at {str(path)!r}")
        return json.loads(path.read_text())
    config = getattr(model, "config", model)  # a model, or a transformers config
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise TypeError(
        f"expected a hidden size, a config dict, a transformers config or model, or a model "
        f"directory; got {type(model).__name__}"
    )


def check_quant_settings(
    bits: int, group_size: int, model: Any = None, *, method: str | None = None
) -> dict[str, int]:
    """Raise :class:`ValueError` naming the bad setting; return the checked layer sizes.

    ``model`` is a hidden size (int), a ``config.json`` dict or path, a model directory, a
    transformers config or a model; ``None`` checks ``bits``, ``group_size`` and ``method``
    alone. ``bits=5`` and ``group_size=48`` with ``hidden_size=576`` both raise.
    """
    if model is None:
        _check_scalars(bits, group_size, method)
        return {}
    if isinstance(model, int) and not isinstance(model, bool):
        return check_quant_config({"hidden_size": model}, bits, group_size, method)
    return check_quant_config(_as_config_dict(model), bits, group_size, method)
