"""Rewards for RL stages (GRPO): ``fn(prompt, completion, reference, **params) -> float``,
registered by name in :data:`REWARDS`; :func:`combine` forms a weighted sum of named ones."""

from .simple import (
    REWARDS,
    RewardFn,
    combine,
    format_reward,
    get_reward,
    length_reward,
    reasoning_steps_reward,
    reference_overlap_reward,
)

__all__ = [
    "REWARDS",
    "RewardFn",
    "combine",
    "format_reward",
    "get_reward",
    "length_reward",
    "reasoning_steps_reward",
    "reference_overlap_reward",
]
