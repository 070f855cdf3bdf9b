"""A group of actors playing one role: placement, fan-out, sharding by rank, gathering."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class RoleGroup:
    """``num`` actors of ``actor_cls`` reserved together in one placement group.

    ``make_args(rank)`` returns the constructor ``(args, kwargs)`` of rank ``rank``. Bundles are
    packed (same node when they fit), so a learner group's gloo/NCCL ring stays local where it
    can. Use :meth:`call` to run a method on every actor, :meth:`map_shards` to split a list of
    items into contiguous rank shards and gather the results in the original order.
    """

    def __init__(
        self,
        actor_cls: type,
        num: int,
        *,
        num_cpus: float,
        num_gpus: float = 0.0,
        make_args: Callable[[int], tuple[tuple, dict]] = lambda rank: ((), {}),
        name: str = "role",
        strategy: str = "PACK",
    ):
        if num < 1:
            raise ValueError(f"role group '{name}' needs at least one actor, got {num}")
        self.name = name
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self.pg = placement_group([dict(bundle) for _ in range(num)], strategy=strategy)
        ray.get(self.pg.ready(), timeout=600)
        remote_cls = ray.remote(actor_cls) if not hasattr(actor_cls, "remote") else actor_cls
        self.actors = []
        for rank in range(num):
            args, kwargs = make_args(rank)
            actor = remote_cls.options(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=rank
                ),
                name=None,
            ).remote(*args, **kwargs)
            self.actors.append(actor)

    def __len__(self) -> int:
        return len(self.actors)

    def call_async(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call(self, method: str, *args, **kwargs) -> list[Any]:
        """Run ``method`` on every actor with the same arguments; results by rank."""
        return ray.get(self.call_async(method, *args, **kwargs))

    def call_rank(self, rank: int, method: str, *args, **kwargs) -> Any:
        return ray.get(getattr(self.actors[rank], method).remote(*args, **kwargs))

    def call_per_rank(self, method: str, per_rank_args: Sequence[tuple], **kwargs) -> list[Any]:
        """Run ``method`` on each actor with its own positional arguments."""
        refs = [
            getattr(a, method).remote(*args, **kwargs)
            for a, args in zip(self.actors, per_rank_args, strict=True)
        ]
        return ray.get(refs)

    def map_shards(self, method: str, items: Sequence, **kwargs) -> list[Any]:
        """Split ``items`` into ``len(self)`` contiguous shards, one per actor; each actor's
        method takes its shard and returns a list of per-item results; results come back
        flattened in the original item order."""
        shards = shard(items, len(self.actors))
        refs = [
            getattr(a, method).remote(list(s), **kwargs)
            for a, s in zip(self.actors, shards)
            if len(s)
        ]
        out: list[Any] = []
        for part in ray.get(refs):
            out.extend(part)
        return out

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        remove_placement_group(self.pg)


def shard(items: Sequence, n: int) -> list[Sequence]:
    """Contiguous near-equal shards (the first ``len % n`` shards get one extra item)."""
    base, extra = divmod(len(items), n)
    out, start = [], 0
    for rank in range(n):
        size = base + (1 if rank < extra else 0)
        out.append(items[start : start + size])
        start += size
    return out
