"""Rewards as Ray tasks: a batch reward function applied to shards of a batch in parallel.

A reward function is ``fn(examples, completions) -> list[float]`` (see :mod:`raykd.rewards`).
With ``num_tasks = 0`` it runs in the calling process; otherwise the batch is cut into
``num_tasks`` contiguous shards, each scored by a Ray task with ``cpus_per_task`` CPUs, and the
results come back in order (:func:`score_with_parts` also returns each named reward's
values). ``timeout_s`` bounds the wait for all of them: a reward that hangs
fails the step with a message instead of stalling training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ray
from ray.exceptions import GetTimeoutError

from raykd.roles.group import shard


def _apply(fn: Callable, examples: list, completions: list[str]):
    """``(totals, {name: values})``: a :class:`~raykd.rewards.WeightedRewards` also gives each
    named reward's values; any other batch function only its totals."""
    if hasattr(fn, "score"):
        totals, parts = fn.score(examples, completions)
        return [float(x) for x in totals], {k: [float(x) for x in v] for k, v in parts.items()}
    return [float(x) for x in fn(examples, completions)], {}


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
    return score_with_parts(
        fn,
        examples,
        completions,
        num_tasks=num_tasks,
        cpus_per_task=cpus_per_task,
        timeout_s=timeout_s,
    )[0]


def score_with_parts(
    fn: Callable,
    examples: Sequence,
    completions: Sequence[str],
    *,
    num_tasks: int = 0,
    cpus_per_task: float = 0.5,
    timeout_s: float | None = None,
) -> tuple[list[float], dict[str, list[float]]]:
    """:func:`score_completions`, plus each named reward's values when ``fn`` has them."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples for {len(completions)} completions")
    if num_tasks <= 0:
        out, parts = _apply(fn, list(examples), list(completions))
    else:
        task = ray.remote(num_cpus=cpus_per_task)(_apply)
        fn_ref = ray.put(fn)
        refs = [
            task.remote(fn_ref, list(e), list(c))
            for e, c in zip(shard(examples, num_tasks), shard(completions, num_tasks))
            if len(e)
        ]
        try:
            results = ray.get(refs, timeout=timeout_s)
        except GetTimeoutError:
            for r in refs:
                ray.cancel(r, force=True)
            raise TimeoutError(
                f"reward tasks did not finish within {timeout_s} s ({len(examples)} completions)"
            ) from None
        out = [x for p, _ in results for x in p]
        parts = {k: [x for _, q in results for x in q[k]] for k in results[0][1]}
    if len(out) != len(completions):
        raise ValueError(f"reward returned {len(out)} values for {len(completions)} completions")
    return out, parts
