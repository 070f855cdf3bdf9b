"""On-policy distillation by policy gradient: the MiniLLM family (Gu et al., ICLR 2024).

MiniLLM minimises the sequence-level reverse KL ``KL(q_θ ‖ p_T)`` over sampled responses ``y``.
With per-token reward ``r_t = log p_T(y_t | y_<t) − log q(y_t | y_<t)`` its gradient splits into

* a *long-term* policy-gradient part on future rewards ``R_{t+1} = Σ_{s>t} γ^{s−t−1} r_s``
  (length-normalised: divided by the number of remaining tokens), optimised PPO-style with a
  clipped ratio ``ρ_t = q_θ(y_t) / q_old(y_t)``;
* a *single-step* part, the reverse KL at each position over the full vocabulary,
  ``KL(q_θ(·|y_<t) ‖ p_T(·|y_<t))``, whose gradient is exact (no sampling of ``y_t``);
* optionally a language-modelling term on a pretraining batch (``L_PT``).

When responses are sampled from the mixture ``p̃ = α p_T + (1 − α) q_θ`` (teacher-mixed
sampling), both parts are weighted per token by ``w_t = q_θ(y_t) / p̃(y_t)``.

Per-token tensors are ``[B, T]`` with the batch alignment convention; the time axis is the last.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._rowwise import DEFAULT_CHUNK_SIZE
from .divergences import reverse_kl
from .reduction import Reduction, masked_mean, masked_sum, reduce_loss


def minillm_rewards(teacher_logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-token reward ``r_t = log p_T(y_t) − log q_old(y_t)`` on the mask, 0 elsewhere.

    Detached: rewards are constants of the policy-gradient objective.
    """
    r = (teacher_logprobs - old_logprobs).detach()
    return torch.where(mask.bool(), r, torch.zeros((), dtype=r.dtype, device=r.device))


def discounted_returns(
    rewards: Tensor, mask: Tensor, gamma: float = 1.0, length_normalize: bool = False
) -> Tensor:
    """Reward-to-go along the last (time) axis, 0 off the mask.

    ``R_t = Σ_{s ≥ t} γ^{s−t} m_s r_s``; with ``length_normalize``, ``R_t / L_t`` where
    ``L_t = Σ_{s ≥ t} m_s`` is the number of remaining response tokens (``T − t`` for a
    response of length ``T`` indexed from 0).
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    m = mask.to(rewards.dtype)
    r = torch.where(
        mask.bool(), rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    )
    returns = torch.zeros_like(r)
    running = torch.zeros_like(r[..., 0])
    for t in range(r.shape[-1] - 1, -1, -1):
        running = r[..., t] + gamma * running
        returns[..., t] = running
    if length_normalize:
        remaining = m.flip(-1).cumsum(-1).flip(-1)
        returns = returns / remaining.clamp(min=1.0)
    return returns * m


def whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Masked whitening ``(x − μ) / sqrt(σ² + eps)``, 0 off the mask.

    ``μ = Σ m x / Σ m`` and the unbiased ``σ² = Σ m (x − μ)² / (Σ m − 1)`` over all masked
    entries. ``shift_mean=False`` adds ``μ`` back (scale only).
    """
    mean = masked_mean(x, mask)
    count = mask.to(x.dtype).sum()
    var = masked_sum((x - mean) ** 2, mask) / (count - 1).clamp(min=1.0)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))


def minillm_advantages(
    returns: Tensor, mask: Tensor, *, future_only: bool = False, whiten_advantages: bool = False
) -> Tensor:
    """MiniLLM's long-term advantage from :func:`discounted_returns` ``R_t``.

    ``A_t = R_t``; with ``future_only`` (when the single-step term already covers step ``t``
    exactly) ``A_t = R_{t+1}``, the return of the tokens after ``t`` (0 at a response's last
    token). Optionally whitened (:func:`whiten`). 0 off the mask; detached.
    """
    adv = returns.detach()
    if future_only:
        shifted = torch.zeros_like(adv)
        shifted[..., :-1] = adv[..., 1:]
        adv = shifted * mask.to(adv.dtype)
    if whiten_advantages:
        adv = whiten(adv, mask)
    return adv


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[Tensor, Tensor]:
    """Per-token PPO surrogate ``−min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high)·A)`` and ``ρ``.

    ``ρ = exp(log π − log π_old)``; ``old_logprobs`` and ``advantages`` are detached. Advantages
    of shape ``[B]`` (one per sequence) broadcast over time.
    """
    ratio = torch.exp(logprobs - old_logprobs.detach())
    adv = advantages.detach()
    if adv.dim() == ratio.dim() - 1:
        adv = adv.unsqueeze(-1)
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return -torch.min(ratio * adv, clipped * adv), ratio


def clip_fractions(
    ratio: Tensor, advantages: Tensor, mask: Tensor, low: float, high: float
) -> tuple[Tensor, Tensor]:
    """Masked fractions of tokens whose gradient the clip removes (low side, high side)."""
    adv = advantages.detach()
    if adv.dim() == ratio.dim() - 1:
        adv = adv.unsqueeze(-1)
    is_low = ((ratio < 1.0 - low) & (adv < 0)).to(ratio.dtype)
    is_high = ((ratio > 1.0 + high) & (adv > 0)).to(ratio.dtype)
    return masked_mean(is_low.detach(), mask), masked_mean(is_high.detach(), mask)


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    importance_weights: Tensor | None = None,
    reduction: Reduction = "token_mean",
    num_items: int | float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped policy-gradient loss ``R[w_t · −min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε_high) A_t)]``.

    ``ρ_t = exp(log π(y_t) − log π_old(y_t))``; ``A_t`` (``[B, T]`` or ``[B]``) and the optional
    per-token importance weights ``w_t`` are detached -- no gradient flows into them.
    ``ε_high`` defaults to ``ε``. ``R`` is :func:`reduce_loss` with ``reduction``.

    Returns:
        ``(loss, {"policy_loss", "clip_frac_low", "clip_frac_high", "ratio_mean"})``.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    per_token, ratio = clipped_surrogate(logprobs, old_logprobs, advantages, clip_eps, high)
    if importance_weights is not None:
        per_token = per_token * importance_weights.detach()
    loss = reduce_loss(per_token, mask, reduction, num_items)
    low_frac, high_frac = clip_fractions(ratio, advantages, mask, clip_eps, high)
    metrics = {
        "policy_loss": loss.item(),
        "clip_frac_low": low_frac.item(),
        "clip_frac_high": high_frac.item(),
        "ratio_mean": masked_mean(ratio.detach(), mask).item(),
    }
    return loss, metrics


def log_mixture(teacher_logprobs: Tensor, student_logprobs: Tensor, mix_alpha: float) -> Tensor:
    """``log p̃ = log(α p_T + (1−α) q_S)``, computed as
    ``logaddexp(log α + log p_T, log(1−α) + log q_S)`` (exactly ``log q_S`` at ``α = 0`` and
    ``log p_T`` at ``α = 1``). Works elementwise: on sampled-token log-probs or on whole
    next-token distributions."""
    if not 0.0 <= mix_alpha <= 1.0:
        raise ValueError(f"mix_alpha must be in [0, 1], got {mix_alpha}")
    if mix_alpha == 0.0:
        return student_logprobs
    if mix_alpha == 1.0:
        return teacher_logprobs
    return torch.logaddexp(
        teacher_logprobs + math.log(mix_alpha), student_logprobs + math.log1p(-mix_alpha)
    )


def teacher_mixed_importance_weights(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mix_alpha: float,
    *,
    max_weight: float | None = None,
) -> Tensor:
    """Per-token weights ``w_t = q_S(y_t) / p̃(y_t)`` for samples from ``p̃ = α p_T + (1−α) q_S``.

    Computed in log space: ``log w = log q − logaddexp(log α + log p, log(1−α) + log q)``.
    MiniLLM replaces the sequence-level ratio ``Π_t q/p̃`` (high variance) by this per-token
    ratio. Since ``p̃ ≥ (1−α) q``, ``0 ≤ w ≤ 1/(1−α)``; ``max_weight`` clips further.
    ``α = 0`` gives ``w = 1``. Detached.
    """
    log_q, log_p = student_logprobs.detach(), teacher_logprobs.detach()
    if mix_alpha == 0.0:  # sampled from q itself: exactly 1, even where log q = -inf
        return torch.ones_like(log_q)
    w = torch.exp(log_q - log_mixture(log_p, log_q, mix_alpha))
    return w if max_weight is None else w.clamp(max=max_weight)


def single_step_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    weights: Tensor | None = None,
    reduction: Reduction = "token_mean",
    num_items: int | float | Tensor | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """MiniLLM's single-step regulariser ``R[w_t · Σ_v q(v)(log q(v) − log p(v))]``.

    The full-vocabulary reverse KL at every masked position (temperature 1), optionally
    weighted per token by detached ``weights`` (the mixed-sampling importance weights).
    """
    per_token = reverse_kl(student_logits, teacher_logits, mask, chunk_size=chunk_size)
    if weights is not None:
        per_token = per_token * weights.detach().to(per_token.dtype)
    return reduce_loss(per_token, mask, reduction, num_items)


def minillm_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    *,
    student_logits: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    importance_weights: Tensor | None = None,
    gamma: float = 1.0,
    length_normalize: bool = True,
    whiten_advantages: bool = False,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    single_step_coef: float = 1.0,
    lm_loss: Tensor | None = None,
    lm_coef: float = 0.0,
    reduction: Reduction = "token_mean",
    num_items: int | float | Tensor | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, dict[str, float]]:
    """MiniLLM objective on one batch of sampled responses:

    ``L = R[w_t · −min(ρ_t A_t, clip(ρ_t) A_t)] + c_ss · R[w_t · KL(q_θ‖p_T)_t] + c_lm · L_PT``

    * ``r_t = log p_T(y_t) − log q_old(y_t)`` (:func:`minillm_rewards`);
    * ``A_t = R_{t+1}`` -- the (length-normalised) discounted return of the *future* tokens --
      when the single-step term is on (``student_logits`` and ``teacher_logits`` given, it
      covers step ``t`` exactly); otherwise ``A_t = R_t``. Optionally whitened. Detached.
    * ``w_t``: ``importance_weights`` (from :func:`teacher_mixed_importance_weights`), or 1.
    * ``L_PT``: a precomputed scalar (e.g. token cross-entropy on a pretraining/dataset batch).

    Args:
        logprobs: ``[B, T]`` ``log q_θ(y_t)`` of the current policy (differentiable).
        old_logprobs: ``[B, T]`` ``log q_old(y_t)`` at sampling time.
        teacher_logprobs: ``[B, T]`` ``log p_T(y_t)``.
        mask: ``[B, T]`` response tokens.
        student_logits, teacher_logits: aligned ``[B, T, V]`` for the single-step term.
        single_step_coef, lm_coef: weights ``c_ss``, ``c_lm``.
        reduction, num_items: see :func:`reduce_loss` (applied to both token terms).

    Returns:
        ``(loss, metrics)`` with float metrics ``policy_loss``, ``single_step``, ``lm``,
        ``reward_mean``, ``return_mean``, ``clip_frac_low``, ``clip_frac_high``, ``ratio_mean``.
    """
    if (student_logits is None) != (teacher_logits is None):
        raise ValueError("pass both student_logits and teacher_logits, or neither")
    use_single_step = student_logits is not None and single_step_coef != 0.0
    rewards = minillm_rewards(teacher_logprobs, old_logprobs, mask)
    returns = discounted_returns(rewards, mask, gamma, length_normalize)
    advantages = minillm_advantages(
        returns, mask, future_only=use_single_step, whiten_advantages=whiten_advantages
    )

    loss, metrics = clipped_policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        importance_weights=importance_weights,
        reduction=reduction,
        num_items=num_items,
    )
    single = loss.new_zeros(())
    if use_single_step:
        assert student_logits is not None and teacher_logits is not None
        single = single_step_reverse_kl(
            student_logits,
            teacher_logits,
            mask,
            weights=importance_weights,
            reduction=reduction,
            num_items=num_items,
            chunk_size=chunk_size,
        )
        loss = loss + single_step_coef * single
    lm = loss.new_zeros(())
    if lm_loss is not None and lm_coef != 0.0:
        lm = lm_loss
        loss = loss + lm_coef * lm_loss
    metrics.update(
        single_step=single.item(),
        lm=float(lm.detach()),
        reward_mean=masked_mean(rewards, mask).item(),
        return_mean=masked_mean(returns, mask).item(),
        loss=loss.item(),
    )
    return loss, metrics
