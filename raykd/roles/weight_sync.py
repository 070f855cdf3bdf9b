"""Weight sync: the learners' new weights into the samplers, as a strategy.

The learner group owns a strategy (``rollout.weight_sync``) and calls :meth:`sync` after each
update. Weights travel as ``(name, tensor)`` pairs in buckets of about ``bucket_mb`` MiB, not
as one ``state_dict`` call per tensor or one giant message; each storage is sent once (a tied
``lm_head`` is the embedding: :func:`distinct_tensors`), read from the learner's live weights
without a copy first wherever they are whole (below ZeRO-3).

Strategies (:data:`STRATEGIES`):

* ``object_store`` — learner rank 0 puts each bucket in the Ray object store (zero-copy torch
  tensors, see :mod:`raykd.roles.runtime`) and every sampler loads it, ``borrow=True``: a
  sampler whose weights live in CPU memory in the same dtype may use the store's read-only
  buffers as its weights instead of copying them (the ``hf`` one does; all samplers on a node
  then share one copy). The CPU default and the fallback everywhere.

* ``shared_memory`` — learner rank 0 packs the weights into one file on tmpfs (``/dev/shm``,
  ``rollout.shm_dir``) that every sampler on its node maps once and takes as its weights
  (views, no copy; the ``hf`` backend). A sync is then one copy of the weights into the
  mapping and one call per sampler: no object-store allocation, no page faults after the
  first. The file's name is removed as soon as the samplers have mapped it. It falls back to
  ``object_store`` for the rest of the stage (a warning, ``sync_fallback`` 1 in the metrics)
  when a sampler is on another node or the directory lacks room. The default for ``hf``.

* ``torch_group`` — a process group of its own (not ``torch.distributed``'s default group,
  which DeepSpeed and vLLM already own) between learner rank 0 and every engine worker of the
  samplers: gloo on CPU, NCCL on GPU; built on the first sync, then rank 0 broadcasts each
  packed bucket (:mod:`raykd.roles.tensor_transport`). Torch only on the learner side.
* ``cuda_ipc`` — engines colocated with learner rank 0 on one GPU open its packed CUDA
  buffers through CUDA IPC handles (no copy through the host).

``torch_group`` and ``cuda_ipc`` need a sampler backend that takes them
(``SamplerCapabilities.weight_sync``: the ``vllm`` backend; checked at config load).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

import torch

log = logging.getLogger(__name__)
SHM_DIR = "/dev/shm"


def distinct_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs without the tensors that are the very same view of memory as an
    earlier one (tied weights, e.g. a tied ``lm_head``, once); order is preserved."""
    seen: set[tuple] = set()
    out = []
    for name, t in named_tensors:
        view = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if t.numel() and view in seen:
            continue
        seen.add(view)
        out.append((name, t))
    return out


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

    def forget(self) -> None:
        """Drop what the strategy built for the current samplers (an actor was replaced)."""

    def sync(self, learners, samplers) -> dict[str, float]:
        """Push the learners' current weights into every actor of ``samplers``."""
        t0 = time.perf_counter()
        # Every rank takes part (ZeRO-3 gathers the partitions); rank 0 returns the refs.
        per_rank = learners.call("weight_buckets", self.bucket_bytes)
        buckets = per_rank[0]
        pending = []
        for i, ref in enumerate(buckets):
            last = i == len(buckets) - 1
            pending += samplers.start("update_weights", ref, finished=last, borrow=True)
        loaded = samplers.wait(pending)
        return {
            "sync_seconds": time.perf_counter() - t0,
            "sync_buckets": float(len(buckets)),
            "sync_tensors": float(sum(loaded) / max(1, len(samplers))),
        }


class SharedMemorySync(ObjectStoreSync):
    """Learner rank 0 writes into a file mapping that the samplers of its node share."""

    name = "shared_memory"

    def __init__(self, bucket_mb: float = 64.0, shm_dir: str = SHM_DIR):
        super().__init__(bucket_mb)
        self.shm_dir = shm_dir
        self._members = None  # the sampler group that mapped the current file
        self.fallback: str | None = None  # why this strategy syncs through the object store

    def forget(self) -> None:
        self._members = None  # a replaced sampler maps a new file on the next sync

    def _connect(self, learners, samplers) -> tuple[str | None, list]:
        """A new file with the current weights, mapped by every sampler: ``(None, tensors
        loaded per sampler)``, or ``(the reason it cannot be done, [])``."""
        region = learners.call("open_shared_weights", self.shm_dir)[0]
        if "error" in region:
            return region["error"], []
        try:
            loaded = samplers.call("load_shared_weights", region)
        finally:
            learners.call_rank(0, "unlink_shared_weights")
        missing = [i for i, n in enumerate(loaded) if n is None]
        if missing:
            return f"rollout worker(s) {missing} cannot map {region['path']} (another node)", []
        self._members = samplers
        return None, loaded

    def sync(self, learners, samplers) -> dict[str, float]:
        t0 = time.perf_counter()
        if self.fallback is None and self._members is not samplers:
            self.fallback, loaded = self._connect(learners, samplers)
            if self.fallback is None:
                return self._stats(t0, samplers, loaded)
            log.warning("shared_memory weight sync: %s; syncing through the object store "
                        "instead", self.fallback)  # fmt: skip
            learners.call("close_shared_weights")
        if self.fallback is not None:
            return {**super().sync(learners, samplers), "sync_fallback": 1.0}
        learners.call("write_shared_weights")
        return self._stats(t0, samplers, samplers.call("load_shared_weights"))

    def _stats(self, t0: float, samplers, loaded) -> dict[str, float]:
        return {
            "sync_seconds": time.perf_counter() - t0,
            "sync_buckets": 1.0,
            "sync_tensors": float(sum(loaded) / max(1, len(samplers))),
            "sync_fallback": 0.0,
        }


class TorchGroupSync(ObjectStoreSync):
    """Learner rank 0 broadcasts buckets over a stateless torch process group to every engine
    worker of the samplers (gloo on CPU, NCCL on GPU)."""

    name = "torch_group"

    def __init__(self, bucket_mb: float = 64.0):
        super().__init__(bucket_mb)
        self._members = None  # the sampler group the process group was built with

    def connect(self, learners, samplers) -> dict[str, float]:
        """Build the group: learner rank 0 is rank 0, sampler ``i``'s engine workers follow."""
        import ray

        t0 = time.perf_counter()
        host, port, backend = learners.call_rank(0, "weight_group_address")
        workers = samplers.call("engine_workers")
        world = 1 + sum(workers)
        offsets = [1 + sum(workers[:i]) for i in range(len(workers))]
        refs = [learners.actors[0].join_weight_group.remote(host, port, world, backend)]
        refs += [
            actor.join_weight_group.remote(host, port, offset, world, backend)
            for actor, offset in zip(samplers.actors, offsets)
        ]
        ray.get(refs)
        self._members = samplers
        return {"sync_connect_seconds": time.perf_counter() - t0, "sync_world": float(world)}

    def forget(self) -> None:
        self._members = None  # rebuilt on the next sync, with the replaced actor

    def sync(self, learners, samplers) -> dict[str, float]:
        t0 = time.perf_counter()
        stats = self.connect(learners, samplers) if self._members is not samplers else {}
        receiving = samplers.start("receive_weights")
        # Every rank takes part (ZeRO-3 gathers); rank 0 sends.
        sent = learners.wait(learners.start("broadcast_weights", self.bucket_bytes))[0]
        loaded = samplers.wait(receiving)
        return {
            **stats,
            "sync_seconds": time.perf_counter() - t0,
            "sync_buckets": float(sent["buckets"]),
            "sync_tensors": float(sum(loaded) / max(1, len(samplers))),
            "sync_mb": sent["bytes"] / 2**20,
        }


class CudaIpcSync(ObjectStoreSync):
    """Engines on learner rank 0's GPU load its packed CUDA buffers through IPC handles; the
    learner frees the buffers once every engine has loaded them."""

    name = "cuda_ipc"

    def sync(self, learners, samplers) -> dict[str, float]:
        t0 = time.perf_counter()
        payload = learners.call("share_weights_ipc", self.bucket_bytes)[0]
        try:
            loaded = samplers.call("load_ipc_weights", payload)
        finally:
            learners.call_rank(0, "release_ipc_weights")
        return {
            "sync_seconds": time.perf_counter() - t0,
            "sync_buckets": float(len(payload)),
            "sync_tensors": float(sum(loaded) / max(1, len(samplers))),
        }


STRATEGIES: dict[str, type] = {
    "shared_memory": SharedMemorySync,
    "object_store": ObjectStoreSync,
    "torch_group": TorchGroupSync,
    "cuda_ipc": CudaIpcSync,
}


def make_strategy(name: str, bucket_mb: float, shm_dir: str = SHM_DIR):
    if name not in STRATEGIES:
        raise ValueError(f"unknown weight sync {name!r}; valid: {', '.join(sorted(STRATEGIES))}")
    if name == "shared_memory":
        return SharedMemorySync(bucket_mb, shm_dir)
    return STRATEGIES[name](bucket_mb)
