"""Round-to-nearest (RTN) weight quantization, the calibration-free baseline for GPTQ.

Every ``nn.Linear`` inside the decoder layers is quantized row by row in groups of
``group_size`` input columns (``-1``: one group per row). For a group ``w`` with
``lo = min(min(w), 0)`` and ``hi = max(max(w), 0)`` (the range always contains 0, as in
GPTQ, so that 0 is exactly representable and ``z`` lies in ``[0, 2^b - 1]``):

* asymmetric (default): ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)``;
* symmetric: ``m = max(-lo, hi)``, ``s = 2m / (2^b - 1)``, ``z = 2^(b-1)``;
* a group of zeros gets ``lo, hi = -1, 1``;
* ``s`` is rounded to float16 (the checkpoint's precision) before the codes are computed;
* ``q = clamp(round(w / s) + z, 0, 2^b - 1)`` and ``w_hat = (q - z) * s``.

:func:`write_rtn_checkpoint` packs the codes into the GPTQ layout
(:mod:`raykd.quantize.gptq_format`) with a ``quantization_config`` like GPTQModel's, so an
RTN checkpoint loads exactly like a GPTQ one (transformers + optimum + gptqmodel).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from raykd.models import decoder_layers
from raykd.quantize.gptq_format import pack_linear

__all__ = [
    "RTNWeight",
    "dequantize",
    "quantization_config",
    "quantized_linears",
    "rtn_quantize_weight",
    "write_rtn_checkpoint",
]


@dataclass
class RTNWeight:
    """RTN result for one weight ``[out, in]``: codes ``[out, in]``, scales/zeros ``[out, G]``."""

    codes: torch.Tensor  # int64 in [0, 2^bits - 1]
    scales: torch.Tensor  # float32, values exactly representable in float16
    zeros: torch.Tensor  # int64 in [0, 2^bits - 1]
    bits: int
    group_size: int


def rtn_quantize_weight(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool = False
) -> RTNWeight:
    """Quantize a ``[out, in]`` weight by per-group min/max round-to-nearest (module docstring)."""
    out_features, in_features = weight.shape
    group = in_features if group_size == -1 else group_size
    if in_features % group:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
    maxq = 2**bits - 1
    w = weight.detach().float().reshape(out_features, in_features // group, group)
    lo = w.amin(-1).clamp(max=0.0)
    hi = w.amax(-1).clamp(min=0.0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo = torch.where(empty, torch.full_like(lo, -1.0), lo)
    hi = torch.where(empty, torch.full_like(hi, 1.0), hi)
    scales = ((hi - lo) / maxq).to(torch.float16).float()
    scales = torch.where(scales > 0, scales, torch.full_like(scales, 2.0**-24))  # fp16 underflow
    if sym:
        zeros = torch.full_like(scales, float((maxq + 1) // 2))
    else:
        zeros = torch.round(-lo / scales).clamp(0, maxq)
    codes = torch.clamp(torch.round(w / scales.unsqueeze(-1)) + zeros.unsqueeze(-1), 0, maxq)
    return RTNWeight(
        codes=codes.reshape(out_features, in_features).to(torch.int64),
        scales=scales,
        zeros=zeros.to(torch.int64),
        bits=bits,
        group_size=group_size,
    )


def dequantize(result: RTNWeight) -> torch.Tensor:
    """``w_hat = (q - z) * s`` per group, float32 ``[out, in]``."""
    out_features, in_features = result.codes.shape
    groups = result.scales.shape[1]
    codes = result.codes.reshape(out_features, groups, in_features // groups)
    w_hat = (codes - result.zeros.unsqueeze(-1)).float() * result.scales.unsqueeze(-1)
    return w_hat.reshape(out_features, in_features)


def quantized_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules inside the decoder layers, by qualified name (what gets quantized)."""
    prefix, layers = decoder_layers(model)
    found: dict[str, nn.Linear] = {}
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                found[f"{prefix}.{index}.{name}"] = module
    return found


def quantization_config(
    bits: int, group_size: int, sym: bool, desc_act: bool = False, quantizer: str = "raykd-rtn"
) -> dict:
    """The ``quantization_config`` block of ``config.json`` for a GPTQ-layout checkpoint."""
    checkpoint_format = "gptq" if sym else "gptq_v2"
    return {
        "quant_method": "gptq",
        "method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "lm_head": False,
        "format": checkpoint_format,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": [quantizer]},
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def write_rtn_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    directory: str | Path,
    *,
    bits: int,
    group_size: int,
    sym: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, int]:
    """RTN-quantize ``model``'s decoder linears and save a GPTQ-layout checkpoint to ``directory``.

    Tensors that are not quantized (embeddings, norms, an untied LM head) are saved in
    ``dtype``; tied tensors once. Writes ``model.safetensors``, ``config.json`` (with
    :func:`quantization_config`), the generation config and the tokenizer into an existing
    directory (the caller publishes it atomically). Returns ``{"layers": n_quantized}``.
    """
    directory = Path(directory)
    checkpoint_format = "gptq" if sym else "gptq_v2"
    linears = quantized_linears(model)
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        if module_name in linears and leaf == "weight":
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:  # tied weights: keep the first name (the input embedding)
            continue
        seen.add(key)
        value = tensor.detach()
        state[name] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
    for name, linear in linears.items():
        result = rtn_quantize_weight(linear.weight, bits, group_size, sym)
        packed = pack_linear(
            result.codes, result.scales, result.zeros, bits, group_size, checkpoint_format
        )
        state.update({f"{name}.{key}": value for key, value in packed.items()})
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    config.quantization_config = quantization_config(bits, group_size, sym)
    config.dtype = _dtype_name(dtype)
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return {"layers": len(linears)}
