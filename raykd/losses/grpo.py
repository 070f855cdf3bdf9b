"""GRPO (Shao et al. 2024) and its loss-aggregation variants, matching TRL's ``GRPOTrainer``.

Per token (``ρ = exp(log π − log π_old)``, advantage ``A`` per sequence, detached):

    ``ℓ_t = −min(ρ_t A, clip(ρ_t, 1 − ε, 1 + ε_high) A) + β · k(π, π_ref)_t``

aggregated over the completion mask ``m [B, T]`` by ``loss_type``:

* ``grpo``:    ``(1/B) Σ_b Σ_t m ℓ / max(Σ_t m, 1)`` -- per-sequence token mean, then mean;
* ``bnpo``:    ``Σ m ℓ / max(Σ m, 1)`` over the local batch;
* ``dr_grpo``: ``Σ m ℓ / (B · max_completion_length)`` (Dr. GRPO, Liu et al. 2025);
* ``dapo``:    ``Σ m ℓ / num_items_in_batch`` -- the global number of completion tokens
  (DAPO, Yu et al. 2025).

These equal TRL 1.16's ``_compute_loss`` with one process, no gradient accumulation and
token-level importance sampling. TRL additionally divides grpo/bnpo/dr_grpo by the number of
accumulation steps; raykd leaves that to the training engine.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .policy_gradient import clip_fractions, clipped_surrogate
from .reduction import masked_mean, masked_sum

ScaleRewards = Literal["group", "batch", "none"]
KLEstimator = Literal["k1", "k2", "k3"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale_rewards: ScaleRewards = "group",
    eps: float = 1e-4,
) -> Tensor:
    """Group-relative advantages for ``rewards [num_prompts · G]`` (groups contiguous).

    ``A_i = (r_i − mean_g(r)) / (σ + eps)`` with ``σ`` the unbiased std of the group
    (``"group"``) or of the whole batch (``"batch"``); ``"none"`` gives ``r_i − mean_g(r)``
    (Dr. GRPO). A group of one has ``σ = 0``. Same as TRL's GRPOTrainer.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size={group_size}, "
            f"got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped)
        std = std.expand_as(grouped).reshape(-1)
    elif scale_rewards == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    return centred / (std + eps)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token estimators of ``KL(π ‖ π_ref)`` from sampled-token log-probs (Schulman 2020).

    With ``d = log π − log π_ref``: ``k1 = d``; ``k2 = ½ d²``; ``k3 = exp(−d) − (−d) − 1``
    (``= exp(ref − π) − (ref − π) − 1``, unbiased and ≥ 0; TRL's choice).
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.exp(-d) + d - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: k1, k2, k3")


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logprobs: Tensor | None = None,
    kl_estimator: KLEstimator = "k3",
    loss_type: LossType = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO loss (formulas in the module docstring).

    Args:
        logprobs: ``[B, T]`` ``log π_θ(y_t)`` (differentiable).
        old_logprobs: ``[B, T]`` ``log π_old(y_t)`` (detached).
        advantages: ``[B]`` (or ``[B, T]``), detached.
        mask: ``[B, T]`` completion tokens.
        epsilon, epsilon_high: clip range ``[1 − ε, 1 + ε_high]``; ``ε_high`` defaults to ``ε``.
        beta: weight of the KL penalty to the reference policy (needs ``ref_logprobs``).
        kl_estimator: ``k1`` | ``k2`` | ``k3``.
        loss_type: ``grpo`` | ``bnpo`` | ``dr_grpo`` | ``dapo``.
        max_completion_length: ``dr_grpo``'s constant; defaults to ``T``.
        num_items_in_batch: ``dapo``'s global token count (required for ``dapo``).

    Returns:
        ``(loss, metrics)``; metrics (floats): ``policy_loss``, ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` and, with ``beta``, ``kl``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    high = epsilon if epsilon_high is None else epsilon_high
    per_token, ratio = clipped_surrogate(logprobs, old_logprobs, advantages, epsilon, high)
    metrics: dict[str, float] = {}
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 requires ref_logprobs")
        kl = kl_penalty(logprobs, ref_logprobs.detach(), kl_estimator)
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask).item()

    if loss_type == "grpo":
        loss = masked_mean(per_token, mask, dim=-1).mean()
    elif loss_type == "bnpo":
        loss = masked_mean(per_token, mask)
    elif loss_type == "dr_grpo":
        length = mask.shape[-1] if max_completion_length is None else max_completion_length
        loss = masked_sum(per_token, mask) / (per_token.shape[0] * length)
    else:  # dapo
        if num_items_in_batch is None:
            raise ValueError("loss_type='dapo' requires num_items_in_batch (global token count)")
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(per_token.device, per_token.dtype)
            num_items_in_batch = num_items_in_batch.clamp(min=1.0)
        else:
            num_items_in_batch = max(float(num_items_in_batch), 1.0)
        loss = masked_sum(per_token, mask) / num_items_in_batch

    low, high_frac = clip_fractions(ratio, advantages, mask, epsilon, high)
    metrics.update(
        {
            "policy_loss": loss.item(),
            "clip_ratio/low_mean": low.item(),
            "clip_ratio/high_mean": high_frac.item(),
            "clip_ratio/region_mean": low.item() + high_frac.item(),
        }
    )
    return loss, metrics
