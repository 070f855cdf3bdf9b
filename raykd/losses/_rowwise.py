"""Position-chunked evaluation of row-separable losses over full-vocabulary logits.

A *row function* maps the student's logits at ``c`` positions, ``z [c, V]``, and matching rows
of other per-position inputs (teacher logits, top-k targets, token ids) to per-position values
``(loss [c], *aux [c])``. Row ``i`` of every output may depend only on row ``i`` of the inputs.

:func:`rowwise` evaluates a row function at the positions a mask selects and scatters the
results back to the leading shape ``[...]`` (zeros elsewhere). Three paths:

* ``chunk_size=None`` (or a per-position input that itself requires grad): one plain autograd
  call on all selected rows. Supports any autograd use (double backward, gradcheck, grads to
  the teacher) and holds several ``N x V`` temporaries.
* student logits need no grad: the row function runs chunk by chunk under ``no_grad``.
* student logits need grad: a fused autograd function. In the forward pass each chunk is
  gathered, upcast, evaluated and differentiated on its own (``∂loss_i/∂z_i`` per row), and the
  per-row gradient is written into one buffer shaped like the logits; the backward pass only
  scales that buffer in place by the incoming per-position gradient. The per-row gradient comes
  from a *fused row function* when the loss has one (closed-form value and gradient computed
  in place on the chunk's own copies: a few ``chunk x V`` temporaries), otherwise from autograd
  on the chunk. Peak memory is one logits-sized gradient buffer (which becomes the logits'
  ``.grad``) plus those temporaries, instead of several ``N x V`` float32 copies. The graph
  supports a single backward pass (no ``retain_graph`` reuse, no double backward), and the
  per-position inputs are constants.

Positions are gathered with advanced indexing on the leading dimensions, so a non-contiguous
view such as ``logits[:, :-1]`` is never copied whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK_SIZE = 128
"""Positions per chunk (``128 x 151936 x 4 B`` = 78 MB per float32 temporary)."""

RowFn = Callable[..., tuple[Tensor, ...]]
"""``row_fn(z [c, V], *rows) -> (loss [c], *aux [c])``, differentiable by autograd."""

FusedRowFn = Callable[..., tuple[tuple[Tensor, ...], Tensor]]
"""``fused_fn(z [c, V], *rows) -> ((loss [c], *aux [c]), ∂loss/∂z [c, V])`` without autograd.
It receives tensors it owns (fresh per-chunk copies) and may overwrite them."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses are computed in float32, or float64 when the logits are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def selected_positions(
    lead_shape: torch.Size, mask: Tensor | None, device: torch.device
) -> tuple[Tensor, ...]:
    """Index tensors (one per leading dim) of the positions where ``mask`` is nonzero."""
    if mask is None:
        return torch.ones(lead_shape, dtype=torch.bool, device=device).nonzero(as_tuple=True)
    if mask.shape != lead_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != leading shape {tuple(lead_shape)}")
    return (mask != 0).nonzero(as_tuple=True)


def _gather(x: Tensor, sel: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
    rows = x[sel]
    return rows.to(dtype) if rows.is_floating_point() else rows


def rowwise(
    student_logits: Tensor,
    row_fn: RowFn,
    row_inputs: Sequence[Tensor],
    mask: Tensor | None,
    chunk_size: int | None,
    fused_fn: FusedRowFn | None = None,
) -> tuple[Tensor, ...]:
    """Evaluate ``row_fn`` at the masked positions; outputs ``[...]``, zero where mask is 0.

    Args:
        student_logits: ``[..., V]``; gathered rows are upcast to :func:`compute_dtype`.
        row_fn: ``row_fn(z [c, V], *rows) -> (loss [c], *aux [c])``; only ``loss`` is
            differentiated, ``aux`` must be detached.
        row_inputs: per-position tensors ``[..., *]`` with the logits' leading shape.
        mask: ``[...]`` float/bool or ``None`` (every position).
        chunk_size: positions per chunk, or ``None`` for one direct autograd call.
        fused_fn: optional closed-form value-and-gradient version of ``row_fn``, used on the
            chunked path when the logits need a gradient.
    """
    if student_logits.dim() < 2:
        raise ValueError(
            f"student logits must be [..., V] with a position dim, got {tuple(student_logits.shape)}"
        )
    lead = student_logits.shape[:-1]
    for r in row_inputs:
        if r.shape[: len(lead)] != lead:
            raise ValueError(
                f"per-position input of shape {tuple(r.shape)} does not match the logits' "
                f"leading shape {tuple(lead)}"
            )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    idx = selected_positions(lead, mask, student_logits.device)
    grad_on = torch.is_grad_enabled()
    if chunk_size is None or (grad_on and any(r.requires_grad for r in row_inputs)):
        return _direct(student_logits, row_fn, idx, row_inputs)
    if not (grad_on and student_logits.requires_grad):
        with torch.no_grad():
            return _chunk_loop(student_logits, row_fn, idx, row_inputs, chunk_size, None)
    fns = (row_fn, fused_fn)
    return _FusedRows.apply(student_logits, fns, idx, tuple(row_inputs), chunk_size)


def _direct(
    student: Tensor, row_fn: RowFn, idx: tuple[Tensor, ...], row_inputs: Sequence[Tensor]
) -> tuple[Tensor, ...]:
    dtype = compute_dtype(student.dtype)
    outs = row_fn(_gather(student, idx, dtype), *(_gather(r, idx, dtype) for r in row_inputs))
    zeros = torch.zeros(student.shape[:-1], dtype=dtype, device=student.device)
    return tuple(zeros.index_put(idx, o.to(dtype)) for o in outs)


def _chunk_loop(
    student: Tensor,
    row_fn: RowFn,
    idx: tuple[Tensor, ...],
    row_inputs: Sequence[Tensor],
    chunk_size: int,
    grad_buffer: Tensor | None,
    fused_fn: FusedRowFn | None = None,
) -> tuple[Tensor, ...]:
    """Evaluate chunk by chunk; with ``grad_buffer``, also write ``∂loss_i/∂z_i`` into it."""
    dtype = compute_dtype(student.dtype)
    n = idx[0].numel() if idx else 0
    outs: list[Tensor] = []
    # At least one (possibly empty) chunk, so the number of outputs is known.
    for start in range(0, max(n, 1), chunk_size):
        sel = tuple(i[start : start + chunk_size] for i in idx)
        rows = _gather(student, sel, dtype)
        extra = [_gather(r, sel, dtype) for r in row_inputs]
        if grad_buffer is None:
            vals = row_fn(rows, *extra)
        elif fused_fn is not None:
            vals, grad = fused_fn(rows, *extra)
            grad_buffer[sel] = grad.to(grad_buffer.dtype)
            del grad
        else:
            with torch.enable_grad():
                rows.requires_grad_(True)
                vals = row_fn(rows, *extra)
                (grad,) = torch.autograd.grad(vals[0].sum(), rows)
            grad_buffer[sel] = grad.to(grad_buffer.dtype)
            del grad
        if not outs:
            outs = [
                torch.zeros(student.shape[:-1], dtype=dtype, device=student.device) for _ in vals
            ]
        for out, val in zip(outs, vals):
            out[sel] = val.detach().to(dtype)
        del rows, extra, vals
    return tuple(outs)


class _FusedRows(torch.autograd.Function):
    """Per-row gradients computed in the forward pass, scaled in place in the backward pass."""

    @staticmethod
    def forward(ctx, student, fns, idx, row_inputs, chunk_size):  # type: ignore[override]
        row_fn, fused_fn = fns
        grad_buffer = torch.zeros(student.shape, dtype=student.dtype, device=student.device)
        outs = _chunk_loop(student, row_fn, idx, row_inputs, chunk_size, grad_buffer, fused_fn)
        ctx.grad_buffer = grad_buffer
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_aux_grads):  # type: ignore[override]
        grad = ctx.grad_buffer
        if grad is None:
            raise RuntimeError(
                "the chunked loss supports a single backward pass; use chunk_size=None to "
                "backpropagate through it more than once"
            )
        ctx.grad_buffer = None  # hand the buffer over (it can become the logits' .grad as is)
        grad.mul_(grad_loss.unsqueeze(-1).to(grad.dtype))
        return grad, None, None, None, None
