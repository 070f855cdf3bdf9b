"""Reducing per-token losses to a scalar.

Every per-token tensor in :mod:`raykd.losses` has the leading shape ``[..., T]`` of its mask
(``T`` = sequence positions, last); a reduction turns ``x[..., T]`` and ``mask[..., T]`` into one
scalar. With ``m`` the 0/1 mask and ``S`` the number of sequences (product of the leading dims):

* ``token_mean``    ``Σ m·x / max(Σ m, 1)``  -- every counted token weighs the same.
* ``sequence_mean`` ``(1/S) Σ_s [Σ_t m·x / max(Σ_t m, 1)]`` -- every sequence weighs the same;
  a sequence without counted tokens contributes 0 but still counts in ``S`` (TRL's GRPO
  convention).
* ``sum``           ``Σ m·x``.
* ``global_token``  ``Σ m·x / num_items`` -- for gradient accumulation: ``num_items`` is the
  number of counted tokens over the whole accumulation window and all ranks, so that summing the
  micro-batch losses gives the exact token mean of the window. The division is by exactly
  ``num_items``: if the training engine also averages gradients over ranks or micro-steps
  (DeepSpeed divides by world size and by ``gradient_accumulation_steps``), pass
  ``num_items / (world_size * grad_accum)`` to compensate.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["token_mean", "sequence_mean", "sum", "global_token"]
REDUCTIONS: tuple[str, ...] = ("token_mean", "sequence_mean", "sum", "global_token")


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``Σ mask·x`` (over ``dim``, or everything), robust to non-finite ``x`` where mask is 0."""
    kept = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``Σ mask·x / max(Σ mask, 1)`` over ``dim`` (or everything)."""
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def reduce_loss(
    per_token: Tensor,
    mask: Tensor | None,
    reduction: Reduction = "token_mean",
    num_items: int | float | Tensor | None = None,
) -> Tensor:
    """Reduce ``per_token[..., T]`` over the positions where ``mask`` is nonzero.

    Formulas (``m`` = mask as 0/1, ``S`` = number of sequences):

    * ``token_mean``:    ``Σ m·x / max(Σ m, 1)``
    * ``sequence_mean``: ``mean_s(Σ_t m·x / max(Σ_t m, 1))``
    * ``sum``:           ``Σ m·x``
    * ``global_token``:  ``Σ m·x / num_items`` (``num_items`` required)

    Args:
        per_token: per-position values ``[..., T]``.
        mask: same shape, float or bool (1 = position counts); ``None`` counts every position.
        reduction: one of :data:`REDUCTIONS`.
        num_items: the normaliser for ``global_token`` (int, float or 0-dim tensor).

    Returns:
        A 0-dim tensor.
    """
    if mask is None:
        mask = torch.ones_like(per_token, dtype=torch.bool)
    if mask.shape != per_token.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} != per-token shape {tuple(per_token.shape)}"
        )
    if reduction == "token_mean":
        return masked_mean(per_token, mask)
    if reduction == "sequence_mean":
        if per_token.dim() == 0:
            raise ValueError("sequence_mean needs a per-token tensor with a sequence dimension")
        return masked_mean(per_token, mask, dim=-1).mean()
    if reduction == "sum":
        return masked_sum(per_token, mask)
    if reduction == "global_token":
        if num_items is None:
            raise ValueError("reduction='global_token' requires num_items (the global token count)")
        if isinstance(num_items, Tensor):
            num_items = num_items.to(device=per_token.device, dtype=per_token.dtype)
        return masked_sum(per_token, mask) / num_items
    raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
