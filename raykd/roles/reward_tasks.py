"""Rewards as Ray tasks: a batch reward function applied to shards of a batch in parallel.

A reward function is ``fn(examples, completions) -> list[float]`` (see :mod:`raykd.rewards`).
With ``num_tasks = 0`` it runs in the calling process; otherwise the batch is cut into
``num_tasks`` contiguous shards, each scored by a Ray task with ``cpus_per_task`` CPUs, and the
results come back in order. ``timeout_s`` bounds the wait for all of them: a reward that hangs
fails the step with a message instead of stalling training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ray
from ray.exceptions import GetTimeoutError

from raykd.roles.group import shard


def _apply(fn: Callable, examples: list, completions: list[str]) -> list[float]:
    return [float(x) for x in fn(examples, completions)]


def score_completions(
    fn: Callable,
    examples: Sequence,
    completions: Sequence[str],
    *,
    num_tasks: int = 0,
    cpus_per_task: float = 0.5,
    timeout_s: float | None = None,
) -> list[float]:
    """``fn(examples, completions)``, in process or sharded over Ray tasks; one float each."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples for {len(completions)} completions")
    if num_tasks <= 0:
        out = _apply(fn, list(examples), list(completions))
    else:
        task = ray.remote(num_cpus=cpus_per_task)(_apply)
        fn_ref = ray.put(fn)
        refs = [
            task.remote(fn_ref, list(e), list(c))
            for e, c in zip(shard(examples, num_tasks), shard(completions, num_tasks))
            if len(e)
        ]
        try:
            parts = ray.get(refs, timeout=timeout_s)
        except GetTimeoutError:
            for r in refs:
                ray.cancel(r, force=True)
            raise TimeoutError(
                f"reward tasks did not finish within {timeout_s} s ({len(examples)} completions)"
            ) from None
        out = [x for p in parts for x in p]
    if len(out) != len(completions):
        raise ValueError(f"reward returned {len(out)} values for {len(completions)} completions")
    return out
