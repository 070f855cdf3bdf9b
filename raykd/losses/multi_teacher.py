"""Distilling from several teachers: ensemble-then-distill."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def ensemble_teacher_logprobs(
    teacher_logits: Sequence[Tensor],
    weights: Sequence[float] | Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Log of the weighted average of the teachers' distributions:

    ``log p_ens = log Σ_k w_k softmax(z_k / τ)  =  logsumexp_k(log w_k + log_softmax(z_k / τ))``

    with ``w`` normalised to sum to 1 (uniform by default). Accumulated teacher by teacher
    with ``logaddexp``, so two ``[..., V]`` float32 tensors are live at a time.

    The result is a normalised log-distribution usable as ``teacher_logits`` of any
    divergence: with the divergence at temperature ``τ'``, the target is
    ``softmax(log p_ens / τ') ∝ p_ens^{1/τ'}`` (the tempered ensemble). To distil from the
    mixture of individually tempered teachers instead, build it with ``temperature=τ`` and
    call the divergence at temperature 1 on ``student_logits / τ``.

    Args:
        teacher_logits: ``K`` tensors ``[..., V]`` of the same shape (same vocabulary).
        weights: ``K`` non-negative weights (not all zero), or ``None`` for uniform.
        temperature: ``τ > 0`` applied to each teacher before mixing.

    Returns:
        ``[..., V]`` float32 (float64 if the logits are) log-probabilities.
    """
    if not teacher_logits:
        raise ValueError("need at least one teacher")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shape = teacher_logits[0].shape
    if any(z.shape != shape for z in teacher_logits):
        raise ValueError("all teacher logits must have the same shape")
    if weights is None:
        w = [1.0 / len(teacher_logits)] * len(teacher_logits)
    else:
        w = [float(x) for x in (weights.tolist() if isinstance(weights, Tensor) else weights)]
        if len(w) != len(teacher_logits):
            raise ValueError(f"{len(w)} weights for {len(teacher_logits)} teachers")
        if any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero, got {w}")
        total = sum(w)
        w = [x / total for x in w]
    dtype = torch.float64 if teacher_logits[0].dtype == torch.float64 else torch.float32
    acc: Tensor | None = None
    for z, wk in zip(teacher_logits, w):
        if wk == 0.0:
            continue
        term = torch.log_softmax(z.to(dtype) / temperature, dim=-1) + math.log(wk)
        acc = term if acc is None else torch.logaddexp(acc, term)
    assert acc is not None
    return acc
