"""Batch rewards by name, and their weighted sum.

A reward is a **batch function** ``fn(examples, completions, **params) -> list[float]``: the
examples carry what a reward may need besides the text (``prompt_text``, ``reference`` and
``meta``, e.g. a problem's tests), and a batch lets a reward run work in parallel (a sandbox
pool, a teacher forward). The GRPO loop calls the combined reward once per step, in process or
as Ray tasks (``raykd.roles.reward_tasks``). Text rewards of one completion
(:mod:`raykd.rewards.text`) are lifted by :func:`per_completion`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from raykd.rewards.execution import execution_reward
from raykd.rewards.text import (
    format_reward,
    length_reward,
    reasoning_steps_reward,
    reference_overlap_reward,
)

BatchReward = Callable[..., list[float]]


def per_completion(fn: Callable[..., float]) -> BatchReward:
    """``fn(prompt, completion, reference, **params) -> float`` as a batch reward."""

    @functools.wraps(fn)
    def batch(examples: Sequence, completions: Sequence[str], **params: Any) -> list[float]:
        return [
            float(fn(ex.prompt_text, text, ex.reference, **params))
            for ex, text in zip(examples, completions, strict=True)
        ]

    batch.per_item = fn  # type: ignore[attr-defined]
    return batch


REWARDS: dict[str, BatchReward] = {
    "format": per_completion(format_reward),
    "reasoning_steps": per_completion(reasoning_steps_reward),
    "length": per_completion(length_reward),
    "reference_overlap": per_completion(reference_overlap_reward),
    "execution": execution_reward,  # runs the problem's tests in the sandbox
}


def register_reward(name: str, fn: BatchReward, *, replace: bool = False) -> None:
    """Add a batch reward to :data:`REWARDS` (refuses to overwrite unless ``replace``)."""
    if name in REWARDS and not replace:
        raise ValueError(f"reward {name!r} is already registered")
    REWARDS[name] = fn


def _check_params(name: str, fn: BatchReward, params: Mapping[str, Any]) -> None:
    item = getattr(fn, "per_item", None)
    try:
        if item is not None:
            inspect.signature(item).bind("", "", "", **params)
        else:
            inspect.signature(fn).bind([], [], **params)
    except TypeError as err:
        raise ValueError(f"reward {name!r}: bad parameters {dict(params)}: {err}") from None


def get_reward(name: str, **params: Any) -> BatchReward:
    """The batch reward registered as ``name`` with ``params`` bound; checks both eagerly."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known: {sorted(REWARDS)}")
    fn = REWARDS[name]
    _check_params(name, fn, params)
    return functools.partial(fn, **params) if params else fn


class WeightedRewards:
    """``r(x, y) = sum_i w_i R_i(x, y)`` over named batch rewards (picklable, so it can run as
    a Ray task). :meth:`score` also returns each named reward's values."""

    def __init__(self, names: list[str], weights: list[float], fns: list[BatchReward]):
        self.names, self.weights, self.fns = names, weights, fns

    def score(self, examples, completions) -> tuple[list[float], dict[str, list[float]]]:
        parts = {
            n: [float(v) for v in fn(examples, completions)] for n, fn in zip(self.names, self.fns)
        }
        for n, vals in parts.items():
            if len(vals) != len(completions):
                raise ValueError(f"reward {n!r} gave {len(vals)} values for {len(completions)}")
        totals = [
            sum(w * parts[n][i] for n, w in zip(self.names, self.weights))
            for i in range(len(completions))
        ]
        return totals, parts

    def __call__(self, examples, completions) -> list[float]:
        return self.score(examples, completions)[0]


def combine(
    names: Sequence[str],
    weights: Sequence[float] | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> WeightedRewards:
    """The weighted sum of the named rewards (weights default to 1.0 each; ``params`` maps a
    reward name to its keyword parameters). Unknown names, unused ``params`` entries and a
    weight count that does not match raise :class:`ValueError`."""
    names = list(names)
    if not names:
        raise ValueError(f"no rewards named; known: {sorted(REWARDS)}")
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} reward weights for {len(names)} rewards {names}")
    params = {k: dict(v) for k, v in (params or {}).items()}
    unused = sorted(set(params) - set(names))
    if unused:
        raise ValueError(f"parameters given for rewards {unused} that are not in {names}")
    return WeightedRewards(names, weights, [get_reward(n, **params.get(n, {})) for n in names])
