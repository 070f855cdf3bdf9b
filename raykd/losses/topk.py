"""Divergences against cached teacher top-k log-probs plus a tail bucket.

A teacher that ships only its top-k log-probs per position (``topk_logprobs [..., k]`` at
indices ``topk_indices [..., k]``, computed at temperature ``τ``; see
:class:`raykd.batch.TopKTargets`) defines a distribution over ``k + 1`` buckets: the ``k``
tokens and the tail ``R`` (every other token), with

    ``p_j = exp(topk_logprobs_j)``,  ``p_R = 1 − Σ_j p_j``.

The student is bucketed the same way from ``log q = log_softmax(z_S / τ)``:

    ``log q_j = log q(topk_indices_j)``,  ``log q_R = logsumexp_{v ∉ top-k} log q(v)``.

The student tail is a log-sum-exp over the non-top-k logits (no ``1 − Σ`` cancellation, exact
gradient). The teacher tail is ``log(1 − exp(logsumexp_j topk_logprobs_j))`` computed with a
stable ``log1mexp`` and floored at the compute dtype's machine epsilon (a mass below that is
rounding noise of the teacher's own log-probs). When ``k = V`` the tail is empty and dropped.

Approximation error. Bucketing is a coarse-graining, so by the data-processing inequality every
divergence here that is an f-divergence -- forward/reverse KL, TVD, JSD_β, skew KLs -- satisfies
``D_bucketed ≤ D_full``, with equality when the student's distribution inside the tail is
proportional to the teacher's (in particular when ``k = V``). For forward KL the gap is exact by
the chain rule: ``KL_full − KL_bucketed = p_R · KL(p(·|R) ‖ q(·|R))``, so it vanishes as the
teacher's tail mass ``p_R → 0`` (``k → V``). The soft cross-entropy also satisfies
``CE_bucketed ≤ CE_full``, but its gap also contains ``p_R · H(p(·|R))``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from ._rowwise import DEFAULT_CHUNK_SIZE, rowwise
from .divergences import KERNELS, Kernel, check_divergence_params, logsumexp_


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x ≤ 0``, accurate over the whole range.

    Uses ``log(−expm1(x))`` for ``x > −log 2`` and ``log1p(−exp(x))`` otherwise (Mächler 2012).
    ``x`` is clamped to ``≤ −eps`` (machine epsilon of its dtype), so the result is finite.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    near_zero = x > -math.log(2.0)
    # Evaluate each branch only on arguments where it is finite (safe gradients too).
    a = torch.where(near_zero, x, torch.full_like(x, -1.0))
    b = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def bucket_rows(
    student_logits: Tensor, topk_logprobs: Tensor, topk_indices: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """``(log q_b, log p_b)`` over the ``k + 1`` buckets (``k`` when ``k = V``), ``[..., k+1]``.

    Works on any leading shape; the student part is differentiable, the teacher part constant.
    """
    u = student_logits / temperature if temperature != 1.0 else student_logits
    lse = torch.logsumexp(u, dim=-1, keepdim=True)
    log_q_top = u.gather(-1, topk_indices) - lse
    log_p_top = topk_logprobs.to(log_q_top.dtype)
    if topk_indices.shape[-1] == u.shape[-1]:
        return log_q_top, log_p_top
    tail_logits = u.scatter(-1, topk_indices, float("-inf"))
    log_q_tail = torch.logsumexp(tail_logits, dim=-1, keepdim=True) - lse
    return torch.cat([log_q_top, log_q_tail], -1), teacher_buckets(log_p_top)


def teacher_buckets(topk_logprobs: Tensor) -> Tensor:
    """``[log p_1, …, log p_k, log p_R]`` with the floored tail ``log(1 − Σ_j p_j)``; constant."""
    log_p_tail = log1mexp(torch.logsumexp(topk_logprobs, dim=-1, keepdim=True))
    return torch.cat([topk_logprobs, log_p_tail], -1).detach()


def topk_fused_(
    z: Tensor, topk_logprobs: Tensor, topk_indices: Tensor, *, kernel: Kernel, temperature: float
) -> tuple[Tensor, Tensor]:
    """Bucketed divergence per row and its gradient w.r.t. ``z``, overwriting ``z``.

    The kernel is differentiated by autograd on the small ``[c, k+1]`` bucket log-probs only,
    ``g_b = ∂D/∂log q_b``, ``G = Σ_b g_b``; the chain rule through the bucketing gives, with
    ``u = z/τ``, ``q = softmax(u)`` and ``w_v = q_v / q_R`` (softmax over the tail):

        ``∂D/∂u_v = g_j − G q_v``         for ``v = topk_indices_j``,
        ``∂D/∂u_v = w_v (g_R − G q_R)``   for ``v`` in the tail,

    and ``∂D/∂z = ∂D/∂u / τ``. Temporaries: ``z`` itself plus one ``[c, V]`` at a time.
    """
    u = z.div_(temperature) if temperature != 1.0 else z
    lse = logsumexp_(u)
    log_q_top = u.gather(-1, topk_indices) - lse
    log_p_top = topk_logprobs.to(u.dtype)
    has_tail = topk_indices.shape[-1] < u.shape[-1]
    if has_tail:
        u.scatter_(-1, topk_indices, float("-inf"))
        lse_tail = logsumexp_(u)
        log_q = torch.cat([log_q_top, lse_tail - lse], -1)
        log_p = teacher_buckets(log_p_top)
    else:
        log_q, log_p = log_q_top, log_p_top
    with torch.enable_grad():
        log_q.requires_grad_(True)
        value = kernel(log_q, log_p)
        (g,) = torch.autograd.grad(value.sum(), log_q)
    total = g.sum(-1, keepdim=True)
    q_top = log_q_top.exp()
    if has_tail:
        q_tail = (lse_tail - lse).exp()
        grad = u.sub_(lse_tail).exp_().mul_(g[..., -1:] - total * q_tail)  # 0 at the top-k
        grad.scatter_(-1, topk_indices, g[..., :-1] - total * q_top)
    else:
        grad = u.scatter_(-1, topk_indices, g - total * q_top)
    return value.detach(), grad.div_(temperature) if temperature != 1.0 else grad


def topk_bucket_logprobs(
    student_logits: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Bucketed ``(log q_b, log p_b)`` for inspection/tests (materialises ``[..., V]`` temps)."""
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    return bucket_rows(student_logits.to(dtype), topk_logprobs, topk_indices, temperature)


def _topk_rows(
    z: Tensor, logprobs: Tensor, indices: Tensor, *, kernel: Kernel, temperature: float
) -> tuple[Tensor]:
    return (kernel(*bucket_rows(z, logprobs, indices, temperature)),)


def _topk_fused_rows(
    z: Tensor, logprobs: Tensor, indices: Tensor, *, kernel: Kernel, temperature: float
) -> tuple[tuple[Tensor], Tensor]:
    value, grad = topk_fused_(z, logprobs, indices, kernel=kernel, temperature=temperature)
    return (value,), grad


def topk_divergence(
    kernel: Kernel,
    student_logits: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    mask: Tensor | None,
    temperature: float,
    chunk_size: int | None,
) -> Tensor:
    """Apply a kernel (:data:`raykd.losses.divergences.KERNELS`) to the bucketed rows; ``[...]``."""
    lead = student_logits.shape[:-1]
    if topk_logprobs.shape != topk_indices.shape or topk_logprobs.shape[:-1] != lead:
        raise ValueError(
            f"top-k log-probs {tuple(topk_logprobs.shape)} and indices "
            f"{tuple(topk_indices.shape)} must both be [..., k] with leading shape {tuple(lead)}"
        )
    if topk_logprobs.shape[-1] > student_logits.shape[-1]:
        raise ValueError("k is larger than the vocabulary")
    row_fn = partial(_topk_rows, kernel=kernel, temperature=temperature)
    fused_fn = partial(_topk_fused_rows, kernel=kernel, temperature=temperature)
    inputs = (topk_logprobs, topk_indices.long())
    return rowwise(student_logits, row_fn, inputs, mask, chunk_size, fused_fn)[0]


def topk_forward_kl(
    student_logits: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Bucketed forward KL per position: ``Σ_b p_b (log p_b − log q_b)`` (≤ the full value).

    Args:
        student_logits: ``[..., V]``.
        topk_logprobs: ``[..., k]`` teacher ``log p^τ`` of its top-k tokens.
        topk_indices: ``[..., k]`` their token ids (distinct per position).
        mask: ``[...]`` float/bool, 1 = position counts; ``None`` = all positions.
        temperature: ``τ`` of the student; must be the one the teacher used.
        chunk_size: positions per chunk, ``None`` for all at once.

    Returns:
        ``[...]`` divergence over the ``k + 1`` buckets, zero where mask is 0.
    """
    check_divergence_params(temperature)
    kernel = KERNELS["forward_kl"]
    return topk_divergence(
        kernel, student_logits, topk_logprobs, topk_indices, mask, temperature, chunk_size
    )


def topk_reverse_kl(
    student_logits: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Bucketed reverse KL: ``Σ_b q_b (log q_b − log p_b)`` (≤ the full value).

    Arguments as in :func:`topk_forward_kl`.
    """
    check_divergence_params(temperature)
    kernel = KERNELS["reverse_kl"]
    return topk_divergence(
        kernel, student_logits, topk_logprobs, topk_indices, mask, temperature, chunk_size
    )


def topk_jsd(
    student_logits: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Bucketed generalized JSD, TRL convention (β weights the teacher):

    ``m_b = β p_b + (1−β) q_b``, ``β KL(p_b‖m_b) + (1−β) KL(q_b‖m_b)``; β = 0 is the forward
    KL, β = 1 the reverse KL. Arguments as in :func:`topk_forward_kl`.
    """
    check_divergence_params(temperature, beta=beta)
    kernel = partial(KERNELS["jsd"], beta=beta)
    return topk_divergence(
        kernel, student_logits, topk_logprobs, topk_indices, mask, temperature, chunk_size
    )


def topk_skew_forward_kl(
    student_logits: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    mask: Tensor | None = None,
    *,
    lam: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Bucketed skew forward KL: ``KL(p_b ‖ λ p_b + (1−λ) q_b)``.

    Arguments as in :func:`topk_forward_kl`; ``lam ∈ [0, 1)``.
    """
    check_divergence_params(temperature, lam=lam)
    kernel = partial(KERNELS["skew_forward_kl"], lam=lam)
    return topk_divergence(
        kernel, student_logits, topk_logprobs, topk_indices, mask, temperature, chunk_size
    )


def topk_skew_reverse_kl(
    student_logits: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    mask: Tensor | None = None,
    *,
    lam: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Bucketed skew reverse KL: ``KL(q_b ‖ λ q_b + (1−λ) p_b)``.

    Arguments as in :func:`topk_forward_kl`; ``lam ∈ [0, 1)``.
    """
    check_divergence_params(temperature, lam=lam)
    kernel = partial(KERNELS["skew_reverse_kl"], lam=lam)
    return topk_divergence(
        kernel, student_logits, topk_logprobs, topk_indices, mask, temperature, chunk_size
    )


def topk_tvd(
    student_logits: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Bucketed total variation: ``½ Σ_b |p_b − q_b|`` (≤ the full value).

    Arguments as in :func:`topk_forward_kl`.
    """
    check_divergence_params(temperature)
    kernel = KERNELS["tvd"]
    return topk_divergence(
        kernel, student_logits, topk_logprobs, topk_indices, mask, temperature, chunk_size
    )


def topk_cross_entropy(
    student_logits: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Bucketed soft cross-entropy: ``−Σ_b p_b log q_b`` (≤ the full value).

    Arguments as in :func:`topk_forward_kl`.
    """
    check_divergence_params(temperature)
    kernel = KERNELS["cross_entropy"]
    return topk_divergence(
        kernel, student_logits, topk_logprobs, topk_indices, mask, temperature, chunk_size
    )
