"""The GPTQ checkpoint layout, written and read without GPTQModel.

A quantized ``Linear`` with ``in`` inputs, ``out`` outputs, ``b``-bit codes and groups of
``g`` input columns (``G = in / g`` groups) is stored as four tensors under its name:

* ``qweight`` int32 ``[in * b / 32, out]``: the codes ``q[o, i]`` packed along the input
  dimension as a little-endian bit stream (code ``i`` of a column occupies stream bits
  ``[i*b, (i+1)*b)``; word ``w`` holds stream bits ``[32w, 32w+32)``). For 4 and 8 bits
  this is ``32/b`` codes per word; for 3 bits 32 codes span 3 words, as in GPTQ.
* ``qzeros`` int32 ``[G, out * b / 32]``: the zero points, packed the same way along
  the output dimension. Format ``gptq_v2`` stores ``z``; the older ``gptq`` (v1) stores
  ``z - 1``, which cannot represent ``z = 0`` -- v1 is therefore only used for symmetric
  quantization (``z = 2^(b-1)``).
* ``scales`` float16 ``[G, out]``.
* ``g_idx`` int32 ``[in]``: the group of each input column (``i // g`` without act-order).

The weight it represents is ``w_hat[o, i] = (q[o, i] - z[g_idx[i], o]) * s[g_idx[i], o]``.
"""

from __future__ import annotations

import torch

from raykd.config.quant import pack_multiple

__all__ = ["dequantize_packed", "pack_linear", "pack_rows", "unpack_linear", "unpack_rows"]

_WORD = 32


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit integers ``[n, cols]`` along dim 0 into int32 ``[n*bits/32, cols]``."""
    n, cols = codes.shape
    if n % pack_multiple(bits):
        raise ValueError(f"{n} rows of {bits}-bit codes do not fill whole int32 words")
    values = codes.to(torch.int64)
    if values.numel() and (values.min() < 0 or values.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}]")
    shifts = torch.arange(bits, dtype=torch.int64).view(1, bits, 1)
    stream = ((values.unsqueeze(1) >> shifts) & 1).reshape(n * bits // _WORD, _WORD, cols)
    words = (stream << torch.arange(_WORD, dtype=torch.int64).view(1, _WORD, 1)).sum(1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # as signed int32
    return words.to(torch.int32)


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[n*bits/32, cols]`` -> int64 codes ``[n, cols]``."""
    rows, cols = words.shape
    values = words.to(torch.int64) & 0xFFFFFFFF
    bit_index = torch.arange(_WORD, dtype=torch.int64).view(1, _WORD, 1)
    stream = ((values.unsqueeze(1) >> bit_index) & 1).reshape(rows * _WORD // bits, bits, cols)
    weights = (1 << torch.arange(bits, dtype=torch.int64)).view(1, bits, 1)
    return (stream * weights).sum(1)


def pack_linear(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    checkpoint_format: str = "gptq_v2",
) -> dict[str, torch.Tensor]:
    """GPTQ tensors of one layer from codes ``[out, in]``, scales and zeros ``[out, G]``.

    Returns ``{"qweight", "qzeros", "scales", "g_idx"}`` (see the module docstring).
    ``scales`` are stored as float16: pass scales already rounded to float16 (as
    :func:`raykd.quantize.rtn.rtn_quantize_weight` does) for the stored weight to equal
    the one the codes were computed against.
    """
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(
            f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}"
        )
    out_features, in_features = codes.shape
    group = in_features if group_size == -1 else group_size
    stored_zeros = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        if bool((stored_zeros == 0).any()):
            raise ValueError("format 'gptq' (v1) cannot store a zero point of 0; use 'gptq_v2'")
        stored_zeros = stored_zeros - 1
    return {
        "qweight": pack_rows(codes.t().contiguous(), bits),
        "qzeros": pack_rows(stored_zeros.contiguous(), bits).t().contiguous(),
        "scales": scales.t().contiguous().to(torch.float16),
        "g_idx": (torch.arange(in_features) // group).to(torch.int32),
    }


def unpack_linear(
    tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq_v2"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``[out, in]``, zeros ``[G, out]``, scales ``[G, out]`` (float32) and ``g_idx``."""
    codes = unpack_rows(tensors["qweight"], bits).t()
    zeros = unpack_rows(tensors["qzeros"].t().contiguous(), bits).t()
    if checkpoint_format == "gptq":
        zeros = (zeros + 1) & (2**bits - 1)
    out_features = tensors["scales"].shape[1]
    return codes, zeros[:, :out_features], tensors["scales"].float(), tensors["g_idx"].long()


def dequantize_packed(
    tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq_v2"
) -> torch.Tensor:
    """The float32 weight ``[out, in]`` a layer's GPTQ tensors represent."""
    codes, zeros, scales, g_idx = unpack_linear(tensors, bits, checkpoint_format)
    return (codes - zeros[g_idx].t()).float() * scales[g_idx].t()
