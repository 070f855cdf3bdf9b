"""One-off jobs as Ray tasks with their own resources (the quantize stage, its measurements).

A task here is a plain importable function run once in a Ray worker that reserves
``num_cpus`` / ``num_gpus`` (in the run's reservation when a placement is given) and sets
its torch thread count first, the way the role actors do. With ``fresh_process`` the worker
exits after the call (``max_calls=1``), so a measurement of load time and peak memory starts
from a process that has loaded nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raykd.roles.group import Placement, check_feasible


def _threaded(fn: Callable, threads: int, args: tuple, kwargs: dict) -> Any:
    import torch

    torch.set_num_threads(max(1, int(threads)))
    return fn(*args, **kwargs)


def run_task(
    fn: Callable,
    *args: Any,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    num_threads: int = 1,
    placement: Placement | None = None,
    fresh_process: bool = False,
    name: str = "task",
    timeout_s: float | None = None,
    **kwargs: Any,
) -> Any:
    """``fn(*args, **kwargs)`` in a Ray task; its result (or its exception, re-raised)."""
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "name": name}
    if placement is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement.pg,
            placement_group_bundle_index=placement.bundle_indices[0],
        )
    else:
        bundle = {"CPU": float(num_cpus), **({"GPU": float(num_gpus)} if num_gpus else {})}
        check_feasible(name, bundle, 1)
    # max_calls is a property of the remote function (not an .options() key)
    remote = ray.remote(max_calls=1 if fresh_process else 0)(_threaded).options(**options)
    ref = remote.remote(fn, num_threads, args, kwargs)
    # A failure re-raises as a RayTaskError that is also an instance of the task's exception.
    return ray.get(ref, timeout=timeout_s)
