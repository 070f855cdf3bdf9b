"""Weight sync: the learners' new weights into the samplers, as a strategy.

The learner group owns a strategy (``rollout.weight_sync``) and calls :meth:`sync` after each
update. Weights travel as ``(name, tensor)`` pairs in buckets of about ``bucket_mb`` MiB, not
as one ``state_dict`` call per tensor or one giant message; a tied ``lm_head`` is sent once
(the sampler's copy shares the embedding's storage).

Strategies (:data:`STRATEGIES`):

* ``object_store`` — learner rank 0 puts each bucket in the Ray object store (zero-copy torch
  tensors, see :mod:`raykd.roles.runtime`) and every sampler loads it. The CPU default and the
  fallback everywhere.

A torch process-group broadcast from learner rank 0 (gloo on CPU, NCCL on GPU) and CUDA IPC
for colocated engines plug in here as further strategies, with the same bucket stream.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import torch


def named_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pairs into consecutive buckets of at most ``bucket_bytes``
    (a tensor larger than that is a bucket of its own); order is preserved."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


class ObjectStoreSync:
    """Learner rank 0 -> object store -> every sampler, bucket by bucket."""

    name = "object_store"

    def __init__(self, bucket_mb: float = 64.0):
        if bucket_mb <= 0:
            raise ValueError(f"weight sync bucket size must be > 0 MiB, got {bucket_mb}")
        self.bucket_bytes = int(bucket_mb * 2**20)

    def sync(self, learners, samplers) -> dict[str, float]:
        """Push the learners' current weights into every actor of ``samplers``."""
        t0 = time.perf_counter()
        # Every rank takes part (ZeRO-3 gathers the partitions); rank 0 returns the refs.
        per_rank = learners.call("weight_buckets", self.bucket_bytes)
        buckets = per_rank[0]
        pending = []
        for i, ref in enumerate(buckets):
            last = i == len(buckets) - 1
            pending += samplers.call_async("update_weights", ref, finished=last)
        import ray

        loaded = ray.get(pending)
        return {
            "sync_seconds": time.perf_counter() - t0,
            "sync_buckets": float(len(buckets)),
            "sync_tensors": float(sum(loaded) / max(1, len(samplers))),
        }


STRATEGIES: dict[str, type] = {"object_store": ObjectStoreSync}


def make_strategy(name: str, bucket_mb: float):
    if name not in STRATEGIES:
        raise ValueError(f"unknown weight sync {name!r}; valid: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name](bucket_mb)
