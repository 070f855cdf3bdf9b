"""Intermediate-layer matching (FitNets, Romero et al. 2015; TinyBERT, Jiao et al. 2020)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .reduction import Reduction, reduce_loss


class HiddenProjector(nn.Module):
    """Learned linear map ``h ↦ W h (+ b)`` from the student width ``d_s`` to the teacher's ``d_t``.

    Train it together with the student (add its parameters to the optimizer).
    """

    def __init__(self, d_student: int, d_teacher: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(d_student, d_teacher, bias=bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden)


def hidden_state_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor | None,
    projection: nn.Module | None = None,
    kind: Literal["mse", "cosine"] = "mse",
    *,
    reduction: Reduction = "token_mean",
    num_items: int | float | Tensor | None = None,
) -> Tensor:
    """Match hidden states at the masked positions; ``ĥ = projection(h_S)`` (or ``h_S``).

    Per position:

    * ``mse``:    ``(1/d_t) Σ_j (ĥ_j − h_T,j)²`` (mean over features);
    * ``cosine``: ``1 − ĥ·h_T / (‖ĥ‖ ‖h_T‖)``;

    then reduced over positions by ``reduction`` (:func:`raykd.losses.reduce_loss`). Only the
    masked positions are projected. ``teacher_hidden`` is used as given (detach it if it
    carries a graph). Computed in float32 (float64 stays float64).

    Args:
        student_hidden: ``[..., d_s]``.
        teacher_hidden: ``[..., d_t]`` with the same leading shape.
        mask: ``[...]`` float/bool, or ``None`` for all positions.
        projection: maps ``d_s → d_t`` (e.g. :class:`HiddenProjector`); required if they differ.
        kind: ``mse`` or ``cosine``.
    """
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(
            f"student {tuple(student_hidden.shape)} and teacher {tuple(teacher_hidden.shape)} "
            "hidden states must share their leading shape"
        )
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=student_hidden.device)
    idx = (mask != 0).nonzero(as_tuple=True)
    h_s = student_hidden[idx]
    if projection is not None:
        h_s = projection(h_s)
    h_t = teacher_hidden[idx]
    if h_s.shape[-1] != h_t.shape[-1]:
        raise ValueError(
            f"hidden widths differ ({h_s.shape[-1]} vs {h_t.shape[-1]}); pass a projection"
        )
    dtype = torch.float64 if h_s.dtype == torch.float64 else torch.float32
    h_s, h_t = h_s.to(dtype), h_t.to(dtype)
    if kind == "mse":
        rows = (h_s - h_t).pow(2).mean(-1)
    elif kind == "cosine":
        rows = 1.0 - F.cosine_similarity(h_s, h_t, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"unknown kind {kind!r}; valid: mse, cosine")
    per_token = torch.zeros(lead, dtype=dtype, device=rows.device).index_put(idx, rows)
    return reduce_loss(per_token, mask, reduction, num_items)


def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher layer matched to each student layer, spread uniformly (TinyBERT's ``g(m)``).

    Student block ``i`` (0-based) ↦ teacher block ``⌈(i + 1) · n_teacher / n_student⌉ − 1``,
    so the last student block maps to the last teacher block; e.g. ``(4, 12) → [2, 5, 8, 11]``.
    Indices are transformer blocks; add 1 to index HF ``hidden_states`` tuples (whose entry
    0 is the embedding output).
    """
    if n_student < 1 or n_teacher < 1:
        raise ValueError(f"layer counts must be >= 1, got {n_student}, {n_teacher}")
    return [((i + 1) * n_teacher + n_student - 1) // n_student - 1 for i in range(n_student)]
