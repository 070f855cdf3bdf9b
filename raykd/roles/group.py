"""A group of actors playing one role: placement, fan-out, sharding by rank, gathering.

This module and its siblings in :mod:`raykd.roles` are the only code in raykd that talks to
Ray: algorithms call methods on a :class:`RoleGroup` and get plain values back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

logger = logging.getLogger(__name__)


class RoleActorDied(RuntimeError):
    """An actor of a role group died (its process was killed, ran out of memory, or its node
    went away) and the group may not replace it: a learner rank (training state), or a
    stateless actor past its ``max_restarts``. ``role`` and ``index`` name it."""

    def __init__(self, role: str, index: int, detail: str):
        self.role, self.index = role, index
        what = "rank" if role == "learner" else "actor"
        super().__init__(f"{role} {what} {index} died mid-stage ({detail})")


@dataclass
class Placement:
    """Where a group's actors go inside a placement group somebody else reserved (a Ray Tune
    trial's ``PlacementGroupFactory``, say): one bundle index per actor. The group never
    removes a placement group it did not create."""

    pg: PlacementGroup
    bundle_indices: list[int] = field(default_factory=list)


class RoleGroup:
    """``num`` actors of ``actor_cls``, each in its own placement-group bundle.

    ``make_args(rank)`` returns the constructor ``(args, kwargs)`` of rank ``rank``. Without
    ``placement`` the group reserves its own placement group (bundles packed: same node when
    they fit, so a learner group's gloo/NCCL ring stays local where it can) and removes it on
    :meth:`shutdown`; with ``placement`` its actors go into the given bundles. ``runtime_env``
    runs the actors in another environment (e.g. ``{"py_executable": ".venv-vllm/bin/python"}``
    for an engine whose pins clash with the learners').

    Fan-out: :meth:`call` (every actor, same arguments), :meth:`call_per_rank` (one argument
    tuple per actor), :meth:`map` (a list of inputs of any length, one call per input,
    round-robin over the actors, results in input order; :meth:`map_calls` with per-call
    arguments), :meth:`map_shards` (contiguous rank
    shards of a list, results flattened in item order), :meth:`submit` / :func:`gather` for
    calls whose results are collected later. A group is a context manager: leaving the
    ``with`` block (normally or by an exception) shuts it down.

    Busy time: every call made through :meth:`call`, :meth:`call_rank`,
    :meth:`call_per_rank`, the ``map*`` methods and :meth:`start` / :meth:`wait` is timed
    inside its actor; :attr:`busy` collects the ``(start, end)`` wall-clock interval of each
    (in the order the results were collected), so a controller can tell the seconds its actors
    worked from the seconds it waited (see ``raykd.algorithms.common.StepTimer``).
    :meth:`call_async` and :meth:`submit` return plain refs and are not timed.

    Faults: an actor that dies (``RayActorError``: SIGKILL, out of memory, a lost node) while
    :meth:`wait` / :meth:`collect` wait on its calls raises :class:`RoleActorDied`, unless the
    group holds no training state and was built with ``max_restarts > 0`` (samplers, teacher
    scorers): then the dead actor is rebuilt with the same constructor arguments in the same
    placement-group bundle (at most ``max_restarts`` times per slot), :attr:`restore` (if set)
    brings it back to the group's state (e.g. the learners re-sync their weights into every
    sampler), and every call of the wait that went to that slot is sent again, in order, with
    a warning naming the role, the actor and the attempt; :attr:`restarts` counts the
    replacements. Ray's own actor restarts are not used: they would rerun calls on a freshly
    constructed actor before its state was restored.
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
        placement: Placement | None = None,
        runtime_env: dict | None = None,
        max_restarts: int = 0,
    ):
        if num < 1:
            raise ValueError(f"role group '{name}' needs at least one actor, got {num}")
        self.name = name
        self._own_pg = placement is None
        if placement is None:
            bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
            check_feasible(name, bundle, num)
            self.pg = placement_group([dict(bundle) for _ in range(num)], strategy=strategy)
            ray.get(self.pg.ready(), timeout=600)
            indices = list(range(num))
        else:
            if len(placement.bundle_indices) != num:
                raise ValueError(
                    f"role group '{name}': {num} actors but {len(placement.bundle_indices)} "
                    "bundles reserved for them"
                )
            self.pg, indices = placement.pg, list(placement.bundle_indices)
        remote_cls = ray.remote(actor_cls) if not hasattr(actor_cls, "remote") else actor_cls
        options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        if runtime_env:
            options["runtime_env"] = runtime_env
        self._remote_cls, self._options, self._make_args = remote_cls, options, make_args
        self._bundles = indices
        self.max_restarts = int(max_restarts)
        self.restarts = 0  # actors replaced so far (all slots)
        self._slot_restarts = [0] * num
        #: ``restore(group, rank)``, run after actor ``rank`` was rebuilt, before its calls
        #: are sent again (the learner group sets it on the samplers it syncs).
        self.restore: Callable[[RoleGroup, int], Any] | None = None
        self._calls: dict[ray.ObjectRef, tuple[int, str, tuple, dict, bool]] = {}
        self._next = 0  # round-robin cursor of submit()
        self.busy: list[tuple[float, float]] = []  # (start, end) of the latest timed calls
        self._busy_total = 0  # timed calls collected so far
        self.actors = [self._build(rank) for rank in range(num)]

    def _build(self, rank: int):
        args, kwargs = self._make_args(rank)
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self.pg, placement_group_bundle_index=self._bundles[rank]
        )
        return self._remote_cls.options(scheduling_strategy=strategy, **self._options).remote(
            *args, **kwargs
        )

    def __len__(self) -> int:
        return len(self.actors)

    def __enter__(self) -> RoleGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- fan-out ------------------------------------------------------------------------
    def call_async(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """Start ``method`` on every actor; plain refs (``ray.get`` them), not timed."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def _send(self, rank: int, method: str, args: tuple, kwargs: dict, timed: bool = True):
        """Start one call on actor ``rank``, remembered until collected (to be resent if the
        actor dies first)."""
        actor = self.actors[rank]
        if timed:
            ref = actor.__ray_call__.remote(_timed_call, method, *args, **kwargs)
        else:
            ref = getattr(actor, method).remote(*args, **kwargs)
        self._calls[ref] = (rank, method, args, kwargs, timed)
        return ref

    def start(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """Start ``method`` on every actor with the same arguments; collect with :meth:`wait`."""
        return [self._send(rank, method, args, kwargs) for rank in range(len(self.actors))]

    def start_calls(
        self, method: str, calls: Sequence[tuple[tuple, dict]], **common_kwargs
    ) -> list[ray.ObjectRef]:
        """Start call ``i`` (its own ``(args, kwargs)``, merged over ``common_kwargs``) on
        actor ``i % len(self)``; collect with :meth:`wait`."""
        n = len(self.actors)
        return [
            self._send(i % n, method, args, {**common_kwargs, **kwargs})
            for i, (args, kwargs) in enumerate(calls)
        ]

    def wait(self, refs: Sequence[ray.ObjectRef]) -> list[Any]:
        """Results of calls started by :meth:`start` / :meth:`start_calls`, in order; their
        intervals inside the actors go to :attr:`busy`. A dead actor is replaced and its
        calls resent, or :class:`RoleActorDied` is raised (see the class docstring)."""
        out = []
        for result, begin, end in self._collect(list(refs)):
            self.busy.append((begin, end))
            out.append(result)
        self._busy_total += len(out)
        if len(self.busy) > _BUSY_KEPT:
            del self.busy[: len(self.busy) - _BUSY_KEPT // 2]
        return out

    def collect(self, refs: Sequence[ray.ObjectRef]) -> list[Any]:
        """Results of calls started by :meth:`submit`, in order (dead actors as in
        :meth:`wait`)."""
        return self._collect(list(refs))

    def _collect(self, refs: list[ray.ObjectRef]) -> list[Any]:
        """``ray.get`` of ``refs`` in order, watching for dead actors as results come in (a
        collective whose peer died would otherwise block the wait)."""
        calls = [self._calls.pop(r, None) for r in refs]
        refs = list(refs)
        results: dict[int, Any] = {}
        where = {r: i for i, r in enumerate(refs)}  # refs still to collect -> position
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            if pending:  # and whatever else is done already
                more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
                ready += more
            for ref in ready:
                if ref not in where:  # superseded: its actor died and the call was resent
                    continue
                i = where.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    rank = calls[i][0] if calls[i] is not None else None
                    self._replace(rank, err)
                    # every call of this wait that went to the slot runs again, in order
                    again = [j for j, c in enumerate(calls) if c is not None and c[0] == rank]
                    for r in [r for r, j in where.items() if j in again]:
                        del where[r]
                    pending = [r for r in pending if r in where]
                    for j in again:
                        _, method, args, kwargs, timed = calls[j]
                        results.pop(j, None)
                        refs[j] = self._send(rank, method, args, kwargs, timed)
                        self._calls.pop(refs[j])
                        where[refs[j]] = j
                        pending.append(refs[j])
                except ray.exceptions.RayTaskError:
                    # a collective whose peer died fails on the survivors too: name the dead
                    rest = list(where)
                    dead = _first_dead(rest, [calls[where[r]] for r in rest])
                    if dead is not None:
                        raise RoleActorDied(self.name, *dead) from None
                    raise
        return [results[i] for i in range(len(refs))]

    def _replace(self, rank: int | None, err: Exception) -> None:
        """Rebuild dead actor ``rank`` in its bundle and restore it, or raise."""
        detail = _died(err)
        if rank is None or self.max_restarts <= 0:
            raise RoleActorDied(self.name, -1 if rank is None else rank, detail) from None
        if self._slot_restarts[rank] >= self.max_restarts:
            raise RoleActorDied(
                self.name, rank, f"{detail}; already replaced {self._slot_restarts[rank]} "
                f"time(s), the limit (max_restarts={self.max_restarts})"
            ) from None  # fmt: skip
        self._slot_restarts[rank] += 1
        self.restarts += 1
        logger.warning(
            "raykd: %s actor %d died (%s); replacing it, attempt %d of %d, and resending its "
            "calls", self.name, rank, type(err).__name__, self._slot_restarts[rank],
            self.max_restarts,
        )  # fmt: skip
        try:
            ray.kill(self.actors[rank], no_restart=True)
        except Exception:  # already gone
            pass
        self.actors[rank] = self._build(rank)
        if self.restore is not None:
            self.restore(self, rank)

    def busy_mark(self) -> int:
        """A mark for :meth:`busy_since`: the number of timed calls collected so far."""
        return self._busy_total

    def busy_since(self, mark: int) -> list[tuple[float, float]]:
        """``(start, end)`` inside the actors of the timed calls collected after ``mark``."""
        n = self._busy_total - mark
        return self.busy[len(self.busy) - n :] if n > 0 else []

    def call(self, method: str, *args, **kwargs) -> list[Any]:
        """Run ``method`` on every actor with the same arguments; results by rank."""
        return self.wait(self.start(method, *args, **kwargs))

    def call_rank(self, rank: int, method: str, *args, **kwargs) -> Any:
        return self.wait([self._send(rank, method, args, kwargs)])[0]

    def call_per_rank(self, method: str, per_rank_args: Sequence[tuple], **kwargs) -> list[Any]:
        """Run ``method`` on each actor with its own positional arguments (one tuple per
        actor, exactly: a collective such as a train step needs every rank)."""
        if len(per_rank_args) != len(self.actors):
            raise ValueError(
                f"role group '{self.name}': {len(per_rank_args)} argument tuples for "
                f"{len(self.actors)} actors"
            )
        return self.wait(self.start_calls(method, [(a, {}) for a in per_rank_args], **kwargs))

    def submit(self, method: str, *args, **kwargs) -> ray.ObjectRef:
        """Start one call on the next actor (round-robin); collect it with :meth:`collect`.
        Calls on one actor run in submission order."""
        rank = self._next % len(self.actors)
        self._next += 1
        return self._send(rank, method, args, kwargs, timed=False)

    def map(self, method: str, inputs: Sequence, **kwargs) -> list[Any]:
        """One call per input (``method(input, **kwargs)``), input ``i`` on actor
        ``i % len(self)``; results in input order. Fewer inputs than actors is fine."""
        return self.map_calls(method, [((x,), {}) for x in inputs], **kwargs)

    def map_calls(
        self, method: str, calls: Sequence[tuple[tuple, dict]], **common_kwargs
    ) -> list[Any]:
        """Like :meth:`map` with each call's own ``(args, kwargs)`` (merged over
        ``common_kwargs``)."""
        return self.wait(self.start_calls(method, calls, **common_kwargs))

    def map_shards(self, method: str, items: Sequence, **kwargs) -> list[Any]:
        """Split ``items`` into ``len(self)`` contiguous shards, one per actor (empty shards
        are not sent); each call takes its shard and returns one result per item; results
        come back flattened in the original item order."""
        shards = [list(s) for s in shard(items, len(self.actors)) if len(s)]
        return [x for part in self.map(method, shards, **kwargs) for x in part]

    def shutdown(self) -> None:
        """Kill the actors (and remove the placement group if this group made it)."""
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        self._calls.clear()
        if self._own_pg and self.pg is not None:
            remove_placement_group(self.pg)
        self.pg = None


def check_feasible(name: str, bundle: dict[str, float], num: int) -> None:
    """Fail in seconds when a fixed-size cluster can never hold ``num`` actors of ``bundle``
    (a laptop's embedded node, say), naming the role, what it asks and what exists. A cluster
    with an autoscaler (``RAYKD_AUTOSCALING=1``, set by jobs on such clusters, or more nodes
    than one) may still grow, so there the placement group simply waits."""
    import os

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if os.environ.get("RAYKD_AUTOSCALING") == "1" or len(nodes) != 1:
        return
    have = nodes[0].get("Resources", {})
    for key, amount in bundle.items():
        if amount > have.get(key, 0.0) + 1e-9 or num * amount > have.get(key, 0.0) + 1e-9:
            raise ValueError(
                f"role '{name}' asks for {num} x {bundle} but this Ray node has "
                f"{ {k: have.get(k, 0.0) for k in bundle} } in all: lower its resources in "
                "the config (cpus_per_* / gpus_per_* / num_workers / num_ranks)"
            )


def _first_dead(pending: list, calls: list, timeout: float = 5.0) -> tuple[int, str] | None:
    """``(rank, detail)`` of the first of ``pending`` whose actor died (waiting up to
    ``timeout`` seconds for them to settle), or None."""
    if not pending:
        return None
    ready, _ = ray.wait(pending, num_returns=len(pending), timeout=timeout)
    for ref in ready:
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as err:
            call = calls[pending.index(ref)]
            return (-1 if call is None else call[0]), _died(err)
        except Exception:
            continue
    return None


def _died(err: Exception) -> str:
    return f"{type(err).__name__}: its process was killed, ran out of memory or lost its node"


_BUSY_KEPT = 4096  # intervals a group keeps (a step's phases read only their own)


def _timed_call(actor, name: str, /, *args, **kwargs) -> tuple[Any, float, float]:
    """Runs inside the actor (through Ray's ``__ray_call__``): ``actor.name(*args, **kwargs)``
    and the wall-clock ``(start, end)`` of the call."""
    begin = time.time()
    result = getattr(actor, name)(*args, **kwargs)
    return result, begin, time.time()


def gather(refs: Iterable[ray.ObjectRef]) -> list[Any]:
    """Results of plain refs (:meth:`RoleGroup.call_async`), in the given order."""
    return ray.get(list(refs))


def shard(items: Sequence, n: int) -> list[Sequence]:
    """Contiguous near-equal shards (the first ``len % n`` shards get one extra item)."""
    base, extra = divmod(len(items), n)
    out, start = [], 0
    for rank in range(n):
        size = base + (1 if rank < extra else 0)
        out.append(items[start : start + size])
        start += size
    return out
