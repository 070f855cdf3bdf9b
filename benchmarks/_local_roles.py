"""In-process stand-ins for raykd's role groups: the same role classes and algorithm code, no
Ray (for ``benchmarks/ray_overhead.py``; not a benchmark itself).

:func:`patch_local_roles` makes ``StageRoles`` build :class:`LocalGroup` s holding plain
instances of the role classes (learner, samplers, scorers) in the calling process; every
fan-out call runs them one after another, timed like an actor call, and weight sync is a
plain in-process copy into the samplers' models (:class:`LocalCopySync`). An algorithm's
``run(ctx)`` then computes the same step as through the roles.
"""

from __future__ import annotations

import time

from raykd.roles.backends import sampler_class, scorer_class
from raykd.roles.factory import LearnerGroup, actor_threads
from raykd.roles.group import RoleGroup
from raykd.roles.learner import Learner
from raykd.roles.runtime import free_port
from raykd.roles.weight_sync import named_buckets


class LocalGroup(RoleGroup):
    """A role group of plain objects in this process (calls run at once, in order)."""

    def __init__(self, instances: list, name: str = "local"):
        self.name = name
        self.actors = list(instances)
        self._own_pg, self.pg = False, None
        self._next = 0
        self.busy, self._busy_total = [], 0
        self.restarts = self.max_restarts = 0  # plain objects never die and are never replaced

    @staticmethod
    def _run(obj, method: str, args: tuple, kwargs: dict):
        begin = time.time()
        result = getattr(obj, method)(*args, **kwargs)
        return result, begin, time.time()

    def start(self, method, *args, **kwargs):
        return [self._run(a, method, args, kwargs) for a in self.actors]

    def start_calls(self, method, calls, **common_kwargs):
        n = len(self.actors)
        return [self._run(self.actors[i % n], method, args, {**common_kwargs, **kwargs})
                for i, (args, kwargs) in enumerate(calls)]  # fmt: skip

    def wait(self, refs):
        out = []
        for result, begin, end in refs:
            self.busy.append((begin, end))
            out.append(result)
        self._busy_total += len(out)
        return out

    collect = wait

    def call_rank(self, rank, method, *args, **kwargs):
        return self.wait([self._run(self.actors[rank], method, args, kwargs)])[0]

    def call_async(self, method, *args, **kwargs):
        raise NotImplementedError("in-process groups have no object refs")

    def submit(self, method, *args, **kwargs):
        raise NotImplementedError("in-process groups have no object refs")

    def shutdown(self) -> None:
        self.actors = []


class LocalLearnerGroup(LocalGroup, LearnerGroup):
    """A one-rank learner in this process (its gloo group and DeepSpeed engine included)."""


class LocalCopySync:
    """Weight sync in one process: learner rank 0's weights (a tied ``lm_head`` left out, as
    every raykd strategy does) copied bucket by bucket into every sampler's model."""

    name = "local_copy"

    def __init__(self, bucket_mb: float = 64.0):
        self.bucket_bytes = int(bucket_mb * 2**20)

    def sync(self, learners, samplers) -> dict[str, float]:
        t0 = time.perf_counter()
        named = learners.call_rank(0, "_sync_tensors")
        buckets = list(named_buckets(named, self.bucket_bytes))
        for i, bucket in enumerate(buckets):
            samplers.call("update_weights", bucket, finished=i == len(buckets) - 1)
        return {"sync_seconds": time.perf_counter() - t0, "sync_buckets": float(len(buckets))}


def local_learner_group(cfg, model_path, setup, *, placement=None) -> LocalLearnerGroup:
    lc = cfg.learner
    if lc.num_ranks != 1:
        raise ValueError("in-process learners: learner.num_ranks must be 1")
    learner = Learner(0, 1, actor_threads(lc.cpus_per_rank, lc.num_threads))
    learner.setup("127.0.0.1", free_port(), model_path, setup)
    group = LocalLearnerGroup([learner], "learner")
    group.weight_sync = LocalCopySync(cfg.rollout.sync_bucket_mb)
    return group


def local_scorer_group(cfg, model_path, *, dtype=None, name="teacher", placement=None,
                       slot="teacher") -> LocalGroup:  # fmt: skip
    tc = cfg.teacher
    cls = scorer_class(tc.backend)
    threads = actor_threads(tc.cpus_per_worker, tc.num_threads)
    return LocalGroup([cls(model_path, dtype or tc.dtype, threads, **cls.config_kwargs(tc))
                       for _ in range(tc.num_workers)], name)  # fmt: skip


def local_sampler_group(cfg, model_path, *, mix_teacher=None, slot="rollout",
                        placement=None) -> LocalGroup:  # fmt: skip
    rc = cfg.rollout
    cls = sampler_class(rc.backend)
    threads = actor_threads(rc.cpus_per_worker, rc.num_threads)
    extra = {**cls.config_kwargs(rc), **({"mix_teacher": mix_teacher} if mix_teacher else {})}
    return LocalGroup([cls(model_path, rc.dtype, threads, **extra)
                       for _ in range(rc.num_workers)], slot)  # fmt: skip


def patch_local_roles() -> None:
    """Make every ``StageRoles`` of this process build in-process groups."""
    import raykd.algorithms.common as common

    common.learner_group = local_learner_group
    common.scorer_group = local_scorer_group
    common.sampler_group = local_sampler_group
