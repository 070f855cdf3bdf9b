"""Size and parameter accounting that stays right for packed (quantized) checkpoints.

Reads only the safetensors headers (shapes and dtypes), never the tensors. A packed
``qweight`` of shape ``[in * b / 32, out]`` represents ``in * out`` logical weights; its
``scales``, ``qzeros`` and ``g_idx`` are quantization overhead, reported separately and not
counted as parameters. So the logical parameter count of a quantized checkpoint equals the
parameter count of the float model it came from (tied embeddings are stored, and counted,
once).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open

from raykd.models import model_size_mb

__all__ = ["checkpoint_stats"]

_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_OVERHEAD = ("scales", "qzeros", "g_idx")


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def _headers(directory: Path) -> dict[str, tuple[str, list[int]]]:
    """``name -> (dtype, shape)`` over every ``*.safetensors`` file in ``directory``."""
    tensors: dict[str, tuple[str, list[int]]] = {}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {str(directory)!r}")
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                tensors[name] = (view.get_dtype(), list(view.get_shape()))
    return tensors


def _quantization_config(directory: Path) -> dict[str, Any] | None:
    config_path = directory / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    return config.get("quantization_config")


def checkpoint_stats(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Logical parameters and byte breakdown of a (possibly GPTQ-packed) safetensors directory.

    Returns:
        ``params`` (logical parameters: packed weights unpacked, overhead excluded),
        ``quantized_params`` (weights stored as ``bits``-bit codes), ``float_params``,
        ``bits`` (``None`` for a float checkpoint), ``quantized_layers``,
        ``packed_weight_bytes`` (qweight), ``overhead_bytes`` (scales + qzeros + g_idx),
        ``float_bytes`` (everything else), ``tensor_bytes`` (their sum), ``size_mb`` (weight
        files on disk, MiB, headers included) and ``bits_per_quantized_weight``
        (``(packed + overhead) * 8 / quantized_params``).
    """
    directory = Path(path).expanduser()
    tensors = _headers(directory)
    quant = _quantization_config(directory)
    bits = int(quant["bits"]) if quant and "bits" in quant else None
    quantized_prefixes = {n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")}
    if quantized_prefixes and bits is None:
        raise ValueError(
            f"{str(directory)!r} has packed qweight tensors but no bits in config.json"
        )
    quantized_params = float_params = 0
    packed_bytes = overhead_bytes = float_bytes = 0
    for name, (dtype, shape) in tensors.items():
        nbytes = _numel(shape) * _BYTES.get(dtype, 0)
        prefix, _, leaf = name.rpartition(".")
        if prefix in quantized_prefixes and leaf == "qweight":
            assert bits is not None
            rows, out_features = shape
            quantized_params += rows * 32 // bits * out_features
            packed_bytes += nbytes
        elif prefix in quantized_prefixes and leaf in _OVERHEAD:
            overhead_bytes += nbytes
        else:
            float_params += _numel(shape)
            float_bytes += nbytes
    stats: dict[str, Any] = {
        "params": quantized_params + float_params,
        "quantized_params": quantized_params,
        "float_params": float_params,
        "bits": bits if quantized_prefixes else None,
        "quantized_layers": len(quantized_prefixes),
        "packed_weight_bytes": packed_bytes,
        "overhead_bytes": overhead_bytes,
        "float_bytes": float_bytes,
        "tensor_bytes": packed_bytes + overhead_bytes + float_bytes,
        "size_mb": model_size_mb(directory),
    }
    stats["bits_per_quantized_weight"] = (
        (packed_bytes + overhead_bytes) * 8 / quantized_params if quantized_params else None
    )
    return stats
