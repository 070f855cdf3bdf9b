"""Rewards for RL stages (GRPO).

A reward is a batch function ``fn(examples, completions, **params) -> list[float]`` registered
by name in :data:`REWARDS` (:mod:`raykd.rewards.registry`); :func:`combine` forms a weighted
sum of named ones. Text rewards of one completion live in :mod:`raykd.rewards.text`; the
execution reward (tests run in the sandbox) in :mod:`raykd.rewards.execution`.
"""

from raykd.rewards.execution import execution_reward
from raykd.rewards.registry import (
    REWARDS,
    BatchReward,
    WeightedRewards,
    combine,
    get_reward,
    per_completion,
    register_reward,
)
from raykd.rewards.text import (
    format_reward,
    length_reward,
    reasoning_steps_reward,
    reference_overlap_reward,
)

__all__ = [
    "REWARDS",
    "BatchReward",
    "WeightedRewards",
    "combine",
    "execution_reward",
    "format_reward",
    "get_reward",
    "length_reward",
    "per_completion",
    "reasoning_steps_reward",
    "reference_overlap_reward",
    "register_reward",
]
