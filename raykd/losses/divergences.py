"""Token-level divergences between a teacher ``p`` and a student ``q`` from full logits.

At temperature ``τ``, ``p = softmax(z_T / τ)`` and ``q = softmax(z_S / τ)`` over the vocabulary
at every position. Each public function returns the per-position divergence ``[...]`` (zero at
positions the mask leaves out) and applies no ``τ²`` factor; reduce it with
:func:`raykd.losses.reduce_loss` (Hinton's ``τ²`` lives in :func:`raykd.losses.hinton_kd_loss`).

Conventions: ``0·log 0 = 0`` (a teacher token with ``p = 0``, e.g. a ``-inf`` logit, adds
nothing where ``p`` is the weighting distribution); student logits must be finite. Inputs are
upcast to float32 (float64 stays float64) one chunk of positions at a time; see
:mod:`raykd.losses._rowwise` for the memory behaviour of ``chunk_size``. On the chunked
training path, forward KL, cross-entropy and reverse KL use closed-form gradients computed in
place (``(q − p)/τ`` and ``q ⊙ (log q − log p − KL)/τ``); the other divergences differentiate
each chunk with autograd.

The *kernels* (``*_kernel``) take log-probability rows ``log q [c, K]`` and ``log p [c, K]``
over any ``K`` outcomes; :mod:`raykd.losses.topk` reuses them on ``k + 1`` buckets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from ._rowwise import DEFAULT_CHUNK_SIZE, rowwise

Kernel = Callable[..., Tensor]


# --------------------------------------------------------------------------------------------
# Kernels over log-probability rows: (log q [c, K], log p [c, K]) -> [c]
# --------------------------------------------------------------------------------------------
def kl_rows(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``KL(a‖b) = Σ_v a_v (log a_v − log b_v)`` per row, with ``0·log 0 = 0``.

    The difference is masked before the product (double ``where``) so that rows with
    ``a_v = 0`` give zero gradients, not ``0·inf = nan``.
    """
    a = log_a.exp()
    diff = torch.where(a > 0, log_a - log_b, torch.zeros((), dtype=a.dtype, device=a.device))
    return (a * diff).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(w·a + (1−w)·b)`` computed in log space."""
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def forward_kl_kernel(log_q: Tensor, log_p: Tensor) -> Tensor:
    """``KL(p‖q) = Σ p (log p − log q)``."""
    return kl_rows(log_p, log_q)


def reverse_kl_kernel(log_q: Tensor, log_p: Tensor) -> Tensor:
    """``KL(q‖p) = Σ q (log q − log p)``."""
    return kl_rows(log_q, log_p)


def jsd_kernel(log_q: Tensor, log_p: Tensor, *, beta: float = 0.5) -> Tensor:
    """Generalized JSD in TRL's convention (see :func:`jsd`)."""
    if beta == 0.0:
        return kl_rows(log_p, log_q)
    if beta == 1.0:
        return kl_rows(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * kl_rows(log_p, log_m) + (1.0 - beta) * kl_rows(log_q, log_m)


def skew_forward_kl_kernel(log_q: Tensor, log_p: Tensor, *, lam: float = 0.1) -> Tensor:
    """``KL(p ‖ λp + (1−λ)q)``."""
    return kl_rows(log_p, _log_mix(log_p, log_q, lam))


def skew_reverse_kl_kernel(log_q: Tensor, log_p: Tensor, *, lam: float = 0.1) -> Tensor:
    """``KL(q ‖ λq + (1−λ)p)``."""
    return kl_rows(log_q, _log_mix(log_q, log_p, lam))


def tvd_kernel(log_q: Tensor, log_p: Tensor) -> Tensor:
    """``½ Σ |p − q|``."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def cross_entropy_kernel(log_q: Tensor, log_p: Tensor) -> Tensor:
    """``−Σ p log q`` (``= KL(p‖q) + H(p)``), with ``0·log 0 = 0``."""
    p = log_p.exp()
    safe = torch.where(p > 0, log_q, torch.zeros((), dtype=p.dtype, device=p.device))
    return -(p * safe).sum(-1)


KERNELS: dict[str, Kernel] = {
    "forward_kl": forward_kl_kernel,
    "reverse_kl": reverse_kl_kernel,
    "jsd": jsd_kernel,
    "skew_forward_kl": skew_forward_kl_kernel,
    "skew_reverse_kl": skew_reverse_kl_kernel,
    "tvd": tvd_kernel,
    "cross_entropy": cross_entropy_kernel,
}


def check_divergence_params(temperature: float, **params: float) -> None:
    """Validate ``temperature > 0``, ``beta ∈ [0, 1]``, ``lam ∈ [0, 1)``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if "beta" in params and not 0.0 <= params["beta"] <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {params['beta']}")
    if "lam" in params and not 0.0 <= params["lam"] < 1.0:
        raise ValueError(f"lam must be in [0, 1), got {params['lam']}")


def tempered_log_softmax(logits: Tensor, temperature: float) -> Tensor:
    """``log softmax(logits / τ)`` over the last dimension."""
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


# --------------------------------------------------------------------------------------------
# Fused (closed-form value and gradient) rows, for the chunked path. They overwrite their
# inputs, which are per-chunk copies owned by the caller; ``u = z_S / τ``.
# --------------------------------------------------------------------------------------------
def logsumexp_(x: Tensor) -> Tensor:
    """``logsumexp`` over the last dim, ``[c, 1]``, with one ``x``-sized temporary (the stock
    op uses two). Rows must not be all ``-inf``."""
    peak = x.amax(dim=-1, keepdim=True)
    return x.sub(peak).exp_().sum(dim=-1, keepdim=True).log_().add_(peak)


def log_softmax_(logits: Tensor, temperature: float) -> Tensor:
    """In-place ``log softmax(logits / τ)``: shift by the row max, then by the log-normaliser
    of the shifted row (as accurate as ``torch.log_softmax``)."""
    if temperature != 1.0:
        logits.div_(temperature)
    logits.sub_(logits.amax(dim=-1, keepdim=True))
    return logits.sub_(logits.exp().sum(dim=-1, keepdim=True).log_())


def forward_kl_fused_(
    z_s: Tensor, z_t: Tensor, temperature: float, *, cross_entropy: bool = False
) -> tuple[Tensor, Tensor]:
    """``KL(p‖q)`` (or ``−Σ p log q``) per row and its gradient ``(q − p) / τ`` w.r.t. ``z_S``.

    Both losses have that gradient because ``Σ p = 1``. Uses ``z_s``/``z_t`` as scratch.
    """
    log_q = log_softmax_(z_s, temperature)
    log_p = log_softmax_(z_t, temperature)
    p = log_p.exp()
    if cross_entropy:
        terms = log_p.copy_(log_q).neg_()
    else:
        terms = log_p.sub_(log_q)
    value = terms.masked_fill_(p == 0, 0.0).mul_(p).sum(-1)  # 0·log 0 = 0
    grad = log_q.exp_().sub_(p)
    return value, grad.div_(temperature) if temperature != 1.0 else grad


def reverse_kl_fused_(z_s: Tensor, z_t: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``KL(q‖p)`` per row and its gradient ``q ⊙ (log q − log p − KL) / τ`` w.r.t. ``z_S``."""
    log_q = log_softmax_(z_s, temperature)
    diff = log_softmax_(z_t, temperature).neg_().add_(log_q)  # log q − log p
    q = log_q.exp_()
    diff.masked_fill_(q == 0, 0.0)
    value = torch.einsum("cv,cv->c", q, diff)
    grad = diff.sub_(value.unsqueeze(-1)).mul_(q)
    return value, grad.div_(temperature) if temperature != 1.0 else grad


def _fkl_fused_rows(
    z_s: Tensor, z_t: Tensor, *, temperature: float
) -> tuple[tuple[Tensor], Tensor]:
    value, grad = forward_kl_fused_(z_s, z_t, temperature)
    return (value,), grad


def _ce_fused_rows(z_s: Tensor, z_t: Tensor, *, temperature: float) -> tuple[tuple[Tensor], Tensor]:
    value, grad = forward_kl_fused_(z_s, z_t, temperature, cross_entropy=True)
    return (value,), grad


def _rkl_fused_rows(
    z_s: Tensor, z_t: Tensor, *, temperature: float
) -> tuple[tuple[Tensor], Tensor]:
    value, grad = reverse_kl_fused_(z_s, z_t, temperature)
    return (value,), grad


_FUSED_FULL: dict[Kernel, Callable[..., tuple[tuple[Tensor], Tensor]]] = {
    forward_kl_kernel: _fkl_fused_rows,
    cross_entropy_kernel: _ce_fused_rows,
    reverse_kl_kernel: _rkl_fused_rows,
}


# --------------------------------------------------------------------------------------------
# Public per-position divergences from full logits
# --------------------------------------------------------------------------------------------
def _full_rows(z_s: Tensor, z_t: Tensor, *, kernel: Kernel, temperature: float) -> tuple[Tensor]:
    return (kernel(tempered_log_softmax(z_s, temperature), tempered_log_softmax(z_t, temperature)),)


def full_divergence(
    kernel: Kernel,
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    temperature: float,
    chunk_size: int | None,
) -> Tensor:
    """Apply a kernel to ``(log q, log p)`` at every masked position; ``[...]``."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    row_fn = partial(_full_rows, kernel=kernel, temperature=temperature)
    fused = _FUSED_FULL.get(kernel)
    fused_fn = None if fused is None else partial(fused, temperature=temperature)
    return rowwise(student_logits, row_fn, (teacher_logits,), mask, chunk_size, fused_fn)[0]


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Forward KL per position: ``KL(p‖q) = Σ_v p(v) (log p(v) − log q(v))``.

    Mode-covering: the student is pushed to put mass wherever the teacher does.

    Args:
        student_logits: ``[..., V]`` (position ``i`` predicts target ``i``).
        teacher_logits: ``[..., V]`` (no gradient flows to it on the chunked path).
        mask: ``[...]`` float/bool, 1 = position counts; ``None`` = all positions.
        temperature: ``τ``; both distributions are ``softmax(logits / τ)``.
        chunk_size: positions per chunk; ``None`` computes all positions at once.

    Returns:
        ``[...]`` float32 (float64 for float64 logits), zero where mask is 0.
    """
    check_divergence_params(temperature)
    return full_divergence(
        forward_kl_kernel, student_logits, teacher_logits, mask, temperature, chunk_size
    )


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Reverse KL per position: ``KL(q‖p) = Σ_v q(v) (log q(v) − log p(v))``.

    Mode-seeking: the student is penalised for mass where the teacher has little. Arguments as
    in :func:`forward_kl`.
    """
    check_divergence_params(temperature)
    return full_divergence(
        reverse_kl_kernel, student_logits, teacher_logits, mask, temperature, chunk_size
    )


def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Generalized Jensen-Shannon divergence per position, in TRL's ``generalized_jsd_loss``
    convention (GKD, Agarwal et al. 2024):

    ``m = β·p + (1−β)·q`` (β weights the *teacher*), computed as
    ``log m = logaddexp(log p + log β, log q + log(1−β))``, and

    ``JSD_β = β·KL(p‖m) + (1−β)·KL(q‖m)``   for ``0 < β < 1``,
    ``JSD_0 = KL(p‖q)`` (forward KL),  ``JSD_1 = KL(q‖p)`` (reverse KL).

    The endpoints are special cases, as in TRL: the formula itself tends to 0 at both ends
    (``JSD_β ≈ β·KL(p‖q)`` for small β), so the value is discontinuous at β ∈ {0, 1}.
    Arguments as in :func:`forward_kl`; ``beta ∈ [0, 1]``.
    """
    check_divergence_params(temperature, beta=beta)
    kernel = partial(jsd_kernel, beta=beta)
    return full_divergence(kernel, student_logits, teacher_logits, mask, temperature, chunk_size)


def skew_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    lam: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Skew forward KL per position (DistiLLM, Ko et al. 2024): ``KL(p ‖ λp + (1−λ)q)``.

    ``λ = 0`` is the forward KL; the mixture keeps the divergence bounded by ``−log λ``.
    DistiLLM's code computes the cross-entropy ``−Σ p log(λp + (1−λ)q)``, which differs by the
    teacher entropy ``H(p)`` (same gradient). ``lam ∈ [0, 1)``; other arguments as in
    :func:`forward_kl`.
    """
    check_divergence_params(temperature, lam=lam)
    kernel = partial(skew_forward_kl_kernel, lam=lam)
    return full_divergence(kernel, student_logits, teacher_logits, mask, temperature, chunk_size)


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    lam: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Skew reverse KL per position (DistiLLM): ``KL(q ‖ λq + (1−λ)p)``.

    ``λ = 0`` is the reverse KL. ``lam ∈ [0, 1)``; other arguments as in :func:`forward_kl`.
    """
    check_divergence_params(temperature, lam=lam)
    kernel = partial(skew_reverse_kl_kernel, lam=lam)
    return full_divergence(kernel, student_logits, teacher_logits, mask, temperature, chunk_size)


def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Total variation distance per position: ``½ Σ_v |p(v) − q(v)|`` (in ``[0, 1]``).

    Arguments as in :func:`forward_kl`.
    """
    check_divergence_params(temperature)
    return full_divergence(
        tvd_kernel, student_logits, teacher_logits, mask, temperature, chunk_size
    )


def cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Soft-target cross-entropy per position: ``−Σ_v p(v) log q(v) = KL(p‖q) + H(p)``.

    Same student gradient as :func:`forward_kl`; the value includes the teacher entropy.
    Arguments as in :func:`forward_kl`.
    """
    check_divergence_params(temperature)
    return full_divergence(
        cross_entropy_kernel, student_logits, teacher_logits, mask, temperature, chunk_size
    )
