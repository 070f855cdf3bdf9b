"""``quantize``: a float checkpoint -> a GPTQ-layout 4/8/3-bit checkpoint, atomically.

Two methods, one output format (so both load the same way, see :mod:`raykd.quantize.measure`):

* ``"gptq"`` -- GPTQ (Frantar et al., 2022) through GPTQModel: each decoder layer's linears
  are quantized column by column, and the rounding error of each column is compensated
  on the not-yet-quantized columns using the inverse Hessian ``H = 2 X X^T`` of the layer's
  inputs ``X`` on the calibration texts (dampened by ``damp_percent`` of its mean
  diagonal). It minimises the layer-output error ``||W X - W_hat X||^2``, not the weight
  error. ``act_order`` quantizes columns in order of decreasing ``diag(H)`` (GPTQModel's
  ``desc_act``); without it GPTQModel's group-aware reordering is used.
* ``"rtn"`` -- round-to-nearest per group (:mod:`raykd.quantize.rtn`); no calibration.

Both quantize every ``Linear`` inside the decoder layers with the same ``bits``,
``group_size`` and grid (asymmetric unless ``sym``); embeddings, norms and the LM head stay
in ``dtype``. Asymmetric checkpoints use format ``gptq_v2`` (v1 cannot store a zero point
of 0); symmetric ones the widely supported ``gptq`` (v1).

The result is built in a temporary sibling of ``out_dir`` and renamed into place, with
``raykd_quantize.json`` (the summary) written last; a complete directory whose recorded
fingerprint (settings, calibration tokens, source files) matches is not redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from raykd.atomic import publish_dir, recover_dir, staging_dir
from raykd.config.quant import check_quant_config
from raykd.models import (
    count_parameters,
    load_model,
    load_tokenizer,
    model_size_mb,
    resolve_model,
)
from raykd.models.gptq_backend import import_gptqmodel
from raykd.quantize.accounting import checkpoint_stats
from raykd.quantize.rtn import write_rtn_checkpoint

__all__ = ["SUMMARY_FILE", "quantize", "read_summary"]

#: Written last into a complete quantized directory.
SUMMARY_FILE = "raykd_quantize.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def read_summary(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The summary of a complete quantized directory, or ``None``."""
    path = Path(directory).expanduser() / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _tokenize_calibration(
    calibration: Sequence[str | Sequence[int]], tokenizer: Any, max_length: int, min_tokens: int
) -> tuple[list[list[int]], int]:
    """Token ids of each calibration item (text as is, no special tokens added), truncated."""
    kept: list[list[int]] = []
    dropped = 0
    for item in calibration:
        if isinstance(item, str):
            ids = tokenizer(item, add_special_tokens=False)["input_ids"]
        else:
            ids = [int(t) for t in item]
        ids = ids[:max_length]
        if len(ids) < min_tokens:
            dropped += 1
            continue
        kept.append(ids)
    return kept, dropped


def _source_fingerprint(source: Path) -> list[Any]:
    files = sorted(p for p in source.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
    config = (source / "config.json").read_text()
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return [str(source), hashlib.sha256(config.encode()).hexdigest(), stats]


def _fingerprint(settings: dict[str, Any], source: Path, calibration: list[list[int]]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(json.dumps(_source_fingerprint(source)).encode())
    for ids in calibration:
        digest.update(json.dumps(ids).encode())
    return digest.hexdigest()


def _float_params(source: Path) -> int | None:
    try:
        return int(checkpoint_stats(source)["params"])
    except FileNotFoundError:  # not a safetensors checkpoint
        return None


def _cast_float_tensors(directory: Path, dtype: torch.dtype) -> None:
    """Store the tensors GPTQModel left in float32 (embeddings, norms) in ``dtype``; scales stay fp16."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        changed = False
        for name, tensor in tensors.items():
            if tensor.dtype == torch.float32 and not name.endswith(".scales"):
                tensors[name] = tensor.to(dtype)
                changed = True
        if changed:
            save_file(tensors, str(path), metadata=metadata)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _run_gptq(
    source: Path,
    target: Path,
    calibration: list[list[int]],
    *,
    bits: int,
    group_size: int,
    act_order: bool,
    sym: bool,
    damp_percent: float,
    batch_size: int,
    device: str,
    workers: int | None,
) -> dict[str, Any]:
    import_gptqmodel(workers)
    from gptqmodel import GPTQModel, QuantizeConfig

    config = QuantizeConfig(
        bits=bits,
        group_size=group_size,
        desc_act=act_order,
        act_group_aware=not act_order,
        sym=sym,
        format="gptq" if sym else "gptq_v2",
        damp_percent=damp_percent,
        offload_to_disk=False,
    )
    model = GPTQModel.load(str(source), config, device=device, dtype=torch.float32)
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calibration]
    model.quantize(rows, batch_size=batch_size, calibration_data_min_length=1)
    model.save(str(target))
    del model
    return {
        "damp_percent": damp_percent,
        "act_group_aware": not act_order,
        "cpu_workers": os.environ.get("GPTQMODEL_CPU_WORKERS"),
    }


def quantize(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    method: str = "gptq",
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    calibration: Sequence[str | Sequence[int]] = (),
    sym: bool = False,
    damp_percent: float = 0.05,
    dtype: str | torch.dtype = "bfloat16",
    max_calibration_tokens: int = 512,
    min_calibration_tokens: int = 10,
    batch_size: int = 1,
    device: str = "cpu",
    cpu_workers: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Quantize the causal LM at ``model_dir`` into ``out_dir``; return a summary dict.

    Args:
        model_dir: A float checkpoint (anything :func:`raykd.models.resolve_model` takes).
        out_dir: Where the quantized checkpoint goes (replaced as a whole if stale).
        method: ``"gptq"`` or ``"rtn"`` (module docstring).
        bits, group_size: Checked by :func:`raykd.quantize.check_quant_config` first.
        act_order: GPTQ only (RTN ignores it and records ``False``).
        calibration: Prompt+response texts (tokenised as is, no special tokens added) or token
            id lists. GPTQ needs at least one item of ``min_calibration_tokens`` tokens;
            shorter ones are dropped and counted, longer ones truncated to
            ``max_calibration_tokens``.
        sym: Symmetric grid (``z = 2^(b-1)``) instead of asymmetric min/max.
        damp_percent: GPTQ Hessian dampening, a fraction of its mean diagonal.
        dtype: Storage dtype of the tensors that are not quantized.
        batch_size, device: GPTQModel's calibration batch size and device.
        cpu_workers: ``GPTQMODEL_CPU_WORKERS`` (default: the cores this process may use).
        force: Redo even when ``out_dir`` holds a matching complete result.

    Returns:
        The settings, ``calibration_used``/``calibration_dropped``/``calibration_tokens``,
        ``seconds``, ``source``/``out_dir``, ``fp_size_mb``, ``fp_params``, the
        :func:`raykd.quantize.checkpoint_stats` of the result (``size_mb``, logical
        ``params``, ``overhead_bytes``...), ``size_ratio`` (quantized / float size on
        disk) and ``skipped`` (True when an existing result was reused).
    """
    method = str(method).lower()
    source = Path(resolve_model(model_dir))
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"quantize needs a local model directory, got {str(model_dir)!r}")
    source_config = json.loads((source / "config.json").read_text())
    if source_config.get("quantization_config"):
        raise ValueError(f"{str(source)!r} is already quantized; quantize a float checkpoint")
    check_quant_config(source_config, bits, group_size, method)
    store_dtype = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(store_dtype, torch.dtype) or not store_dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype")
    act_order = bool(act_order) and method == "gptq"

    tokenizer = load_tokenizer(str(source))
    ids: list[list[int]] = []
    dropped = 0
    if method == "gptq":
        ids, dropped = _tokenize_calibration(
            calibration, tokenizer, max_calibration_tokens, min_calibration_tokens
        )
        if not ids:
            raise ValueError(
                f"GPTQ needs calibration texts of at least {min_calibration_tokens} tokens; "
                f"got {len(calibration)} items, {dropped} too short"
            )
    settings = {
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "act_order": act_order,
        "sym": sym,
        "dtype": str(store_dtype).removeprefix("torch."),
        "damp_percent": damp_percent if method == "gptq" else None,
    }
    target = Path(out_dir).expanduser().absolute()
    recover_dir(target)  # a publish cut between its two renames
    fingerprint = _fingerprint(settings, source, ids)
    previous = read_summary(target)
    if previous and previous.get("fingerprint") == fingerprint and not force:
        return {**previous, "skipped": True}

    start = time.perf_counter()
    extra: dict[str, Any] = {}
    with staging_dir(target) as tmp:
        if method == "gptq":
            extra = _run_gptq(
                source, tmp, ids, bits=bits, group_size=group_size, act_order=act_order,
                sym=sym, damp_percent=damp_percent, batch_size=batch_size, device=device,
                workers=cpu_workers,
            )  # fmt: skip
            _cast_float_tensors(tmp, store_dtype)
            fp_params = None
        else:
            model = load_model(str(source), dtype="float32")
            fp_params = count_parameters(model)["total"]
            write_rtn_checkpoint(
                model, tokenizer, tmp, bits=bits, group_size=group_size, sym=sym,
                dtype=store_dtype,
            )  # fmt: skip
            del model
        seconds = time.perf_counter() - start
        stats = checkpoint_stats(tmp)
        fp_size = model_size_mb(source)
        summary: dict[str, Any] = {
            **settings,
            **extra,
            "format": "gptq" if sym else "gptq_v2",
            "calibration_used": len(ids),
            "calibration_dropped": dropped,
            "calibration_tokens": sum(len(x) for x in ids),
            "seconds": round(seconds, 3),
            "source": str(source),
            "out_dir": str(target),
            "fp_size_mb": fp_size,
            "fp_params": fp_params if fp_params is not None else _float_params(source),
            **stats,
            "size_ratio": stats["size_mb"] / fp_size if fp_size else None,
            "fingerprint": fingerprint,
        }
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        publish_dir(tmp, target, replace=True)
    return {**summary, "skipped": False}
