"""Word-level (token-level) knowledge distillation, Hinton et al. 2015."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ._rowwise import DEFAULT_CHUNK_SIZE, rowwise
from .divergences import (
    KERNELS,
    Kernel,
    check_divergence_params,
    forward_kl_fused_,
    reverse_kl_fused_,
    tempered_log_softmax,
)
from .reduction import Reduction, reduce_loss
from .registry import validate_params
from .topk import bucket_rows, topk_fused_

# Full-logit divergences with a closed-form fused gradient (others use autograd per chunk).
_FUSED_FULL_KD = {
    "forward_kl": forward_kl_fused_,
    "cross_entropy": partial(forward_kl_fused_, cross_entropy=True),
    "reverse_kl": reverse_kl_fused_,
}


def token_cross_entropy_rows(z: Tensor, targets: Tensor) -> Tensor:
    """``−log softmax(z)[target] = logsumexp(z) − z[target]`` per row (temperature 1)."""
    return torch.logsumexp(z, dim=-1) - z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _hinton_rows(
    z: Tensor,
    *inputs: Tensor,
    kernel: Kernel,
    temperature: float,
    kd_weight: float,
    ce_weight: float,
    topk_targets: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if topk_targets:
        logprobs, indices, targets = inputs
        div = kernel(*bucket_rows(z, logprobs, indices, temperature))
    else:
        teacher, targets = inputs
        div = kernel(
            tempered_log_softmax(z, temperature), tempered_log_softmax(teacher, temperature)
        )
    ce = token_cross_entropy_rows(z, targets)
    return kd_weight * div + ce_weight * ce, div.detach(), ce.detach()


def _hinton_fused_rows(
    z: Tensor,
    *inputs: Tensor,
    kd_fused: Callable[..., tuple[Tensor, Tensor]],
    temperature: float,
    kd_weight: float,
    ce_weight: float,
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """Fused value and gradient: ``∂CE/∂z = softmax(z) − onehot(y)`` (at τ = 1) is formed
    before the divergence consumes ``z`` as scratch."""
    *teacher, targets = inputs
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    ce = (lse - z.gather(-1, targets.unsqueeze(-1))).squeeze(-1)
    grad_ce = None
    if ce_weight != 0.0:
        grad_ce = (z - lse).exp_()
        grad_ce.scatter_add_(-1, targets.unsqueeze(-1), torch.full_like(ce, -1.0).unsqueeze(-1))
    div, grad = kd_fused(z, *teacher, temperature)
    grad.mul_(kd_weight)
    if grad_ce is not None:
        grad.add_(grad_ce, alpha=ce_weight)
    return (kd_weight * div + ce_weight * ce, div, ce), grad


def _topk_kd_fused(
    z: Tensor, logprobs: Tensor, indices: Tensor, temperature: float, *, kernel: Kernel
) -> tuple[Tensor, Tensor]:
    return topk_fused_(z, logprobs, indices, kernel=kernel, temperature=temperature)


def hinton_kd_loss(
    student_logits: Tensor,
    targets: Tensor,
    mask: Tensor | None,
    *,
    teacher_logits: Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    divergence_kwargs: Mapping[str, Any] | None = None,
    reduction: Reduction = "token_mean",
    num_items: int | float | Tensor | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, dict[str, float]]:
    """Hinton's mix of a soft teacher term and the hard-label cross-entropy:

    ``loss = α · τ² · R[D(p_T^τ ‖ p_S^τ)] + (1 − α) · R[−log p_S(y_t)]``

    where ``p^τ = softmax(logits / τ)``, ``D`` is the divergence named ``divergence`` (any of
    :data:`raykd.losses.OBJECTIVES`, computed from full teacher logits or top-k targets plus a
    tail bucket), ``R`` is the reduction over masked positions, and the cross-entropy is at
    temperature 1. The ``τ²`` keeps the soft term's gradient scale independent of ``τ``
    (TRL's GKD does not apply it).

    Both terms are evaluated in one pass over position chunks, so only one logits-sized
    gradient buffer is held (see :mod:`raykd.losses._rowwise`).

    Args:
        student_logits: ``[..., V]`` aligned with ``targets``.
        targets: ``[...]`` token ids (any value where mask is 0).
        mask: ``[...]`` float/bool, 1 = position counts.
        teacher_logits: full teacher logits ``[..., V]``, or
        teacher_topk: ``(logprobs [..., k], indices [..., k])`` computed at ``temperature``.
            Exactly one of the two.
        alpha: weight of the distillation term, in ``[0, 1]``.
        temperature: ``τ > 0`` of the distillation term.
        divergence: registry name of ``D``.
        divergence_kwargs: its extra parameters (e.g. ``{"beta": 0.5}`` for ``jsd``).
        reduction, num_items: see :func:`raykd.losses.reduce_loss`.
        chunk_size: positions per chunk; ``None`` computes everything at once.

    Returns:
        ``(loss, {"kd": R[D], "ce": R[CE], "loss": loss})`` -- the metrics are floats, ``kd``
        without the ``α τ²`` factor.
    """
    if (teacher_logits is None) == (teacher_topk is None):
        raise ValueError("pass exactly one of teacher_logits / teacher_topk")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    kwargs = dict(divergence_kwargs or {})
    topk_targets = teacher_topk is not None
    if divergence not in KERNELS:
        raise ValueError(
            f"unknown divergence {divergence!r}; valid names: {', '.join(sorted(KERNELS))}"
        )
    validate_params(
        divergence, kwargs, topk_targets=topk_targets, exclude=("temperature", "chunk_size")
    )
    check_divergence_params(temperature, **kwargs)
    kernel = partial(KERNELS[divergence], **kwargs) if kwargs else KERNELS[divergence]

    if teacher_topk is not None:
        logprobs, indices = teacher_topk
        if logprobs.shape != indices.shape or logprobs.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError("teacher_topk must be (logprobs, indices), both [..., k]")
        inputs: tuple[Tensor, ...] = (logprobs, indices.long(), targets.long())
    else:
        assert teacher_logits is not None
        if teacher_logits.shape != student_logits.shape:
            raise ValueError("teacher_logits must have the student logits' shape")
        inputs = (teacher_logits, targets.long())

    weights = {
        "temperature": temperature,
        "kd_weight": alpha * temperature**2,
        "ce_weight": 1.0 - alpha,
    }
    row_fn = partial(_hinton_rows, kernel=kernel, topk_targets=topk_targets, **weights)
    if topk_targets:
        kd_fused = partial(_topk_kd_fused, kernel=kernel)
    else:
        kd_fused = _FUSED_FULL_KD.get(divergence)
    fused_fn = (
        None if kd_fused is None else partial(_hinton_fused_rows, kd_fused=kd_fused, **weights)
    )
    per_token, kd, ce = rowwise(student_logits, row_fn, inputs, mask, chunk_size, fused_fn)
    if mask is None:
        mask = torch.ones(per_token.shape, dtype=torch.bool, device=per_token.device)
    loss = reduce_loss(per_token, mask, reduction, num_items)
    metrics = {
        "kd": reduce_loss(kd, mask, reduction, num_items).item(),
        "ce": reduce_loss(ce, mask, reduction, num_items).item(),
        "loss": loss.item(),
    }
    return loss, metrics
