"""On-disk cache of teacher top-k targets, computed once per example and reused.

Key: teacher weights fingerprint, k, temperature and the example's token ids, so a later
epoch, a resumed run or another sweep trial with the same teacher and data pays no teacher
forward. One file per example (``torch.save`` of two small tensors), written atomically.
Targets cover only the example's response positions: ``[n_response, k]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from raykd.batch import Example, examples_to_batch, scatter_topk


def model_fingerprint(model_dir: str) -> str:
    """Hash of a model directory's config and weight-file sizes/mtimes (cheap, stable)."""
    h = hashlib.sha256()
    root = Path(model_dir)
    for p in sorted(root.glob("*")):
        if p.suffix in (".json", ".safetensors", ".bin"):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    h.update(str(root.resolve()).encode())
    return h.hexdigest()[:16]


def default_cache_root() -> Path:
    base = os.environ.get("RAYKD_CACHE") or os.path.expanduser("~/.cache/raykd")
    return Path(base) / "targets"


class TopKCache:
    def __init__(self, root: str | Path | None, teacher_dir: str, k: int, temperature: float):
        root = Path(root) if root else default_cache_root()
        self.k, self.temperature = k, temperature
        key = f"{model_fingerprint(teacher_dir)}-k{k}-t{temperature:g}"
        self.dir = root / key
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            meta.write_text(
                json.dumps({"teacher": teacher_dir, "k": k, "temperature": temperature})
            )

    def _path(self, ex: Example) -> Path:
        digest = hashlib.sha256(json.dumps([ex.prompt_ids, ex.response_ids]).encode()).hexdigest()[
            :24
        ]
        return self.dir / f"{digest}.pt"

    def key(self, ex: Example) -> str:
        """The example's entry name: a digest of its token ids."""
        return self._path(ex).name

    def has(self, ex: Example) -> bool:
        return self._path(ex).exists()

    def get(self, ex: Example) -> tuple[torch.Tensor, torch.Tensor] | None:
        p = self._path(ex)
        if not p.exists():
            return None
        data = torch.load(p, weights_only=True)
        return data["logprobs"], data["indices"]

    def put(self, ex: Example, logprobs: torch.Tensor, indices: torch.Tensor) -> None:
        p = self._path(ex)
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
        os.close(fd)
        torch.save({"logprobs": logprobs.contiguous(), "indices": indices.contiguous()}, tmp)
        os.replace(tmp, p)

    def fill(self, examples: list[Example], scorers, pad_id: int, batch_size: int) -> dict:
        """Score every example missing from the cache with the scorer group; return counts."""
        t0 = time.time()
        missing = [ex for ex in examples if not self.has(ex)]
        # Sort by length so padded batches waste little compute.
        missing.sort(key=lambda e: len(e.prompt_ids) + len(e.response_ids))
        TargetPrefetcher(self, scorers, pad_id, batch_size).wait(missing, progress=True)
        return {
            "cached": len(examples) - len(missing),
            "scored": len(missing),
            "seconds": round(time.time() - t0, 1),
        }

    def dense(self, examples: list[Example], batch_loss_mask: torch.Tensor):
        """Scatter cached per-example targets into ``[B, T, k]`` tensors at the response
        positions of ``batch_loss_mask``. Other positions hold a harmless uniform filler."""
        targets = []
        for ex in examples:
            got = self.get(ex)
            if got is None:
                raise KeyError(f"teacher targets for example {ex.uid} are not in the cache")
            targets.append(got)
        return scatter_topk(targets, batch_loss_mask, self.k, [ex.uid for ex in examples])


class TargetPrefetcher:
    """Scores upcoming examples in the background, so teacher time overlaps learner steps.

    :meth:`submit` queues scoring of the examples neither cached nor in flight (one scorer
    call per ``batch_size`` examples, round-robin over the scorer actors by
    :meth:`RoleGroup.submit`; calls on one actor run in submission order); :meth:`wait` blocks until the given examples are cached, writing
    the results it collects. A controller that submits the batches of steps ``s+1 .. s+L``
    before waiting for step ``s`` keeps the teacher ``L`` steps ahead of the learner, and
    scores only the examples training actually reaches.
    """

    def __init__(self, cache: TopKCache, scorers, pad_id: int, batch_size: int):
        self.cache, self.scorers = cache, scorers
        self.pad_id, self.batch_size = pad_id, batch_size
        self._pending: dict = {}  # call (object ref) -> the examples it scores
        self._inflight: dict = {}  # cache file name -> the call scoring it
        self.scored = 0
        self.wait_seconds = 0.0  # time the controller spent blocked on the teacher

    def submit(self, examples: list[Example]) -> None:
        todo, seen = [], set()
        for ex in examples:
            key = self.cache.key(ex)
            if key in seen or key in self._inflight or self.cache.has(ex):
                continue
            seen.add(key)
            todo.append(ex)
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            batch = examples_to_batch(chunk, self.pad_id)
            ref = self.scorers.submit("topk_targets", batch, self.cache.k, self.cache.temperature)
            self._pending[ref] = chunk
            for ex in chunk:
                self._inflight[self.cache.key(ex)] = ref

    def wait(self, examples: list[Example], progress: bool = False) -> None:
        """Block until ``examples`` are cached (scoring what is neither cached nor in flight),
        collecting results in submission order; ``progress`` prints a line per scorer call."""
        t0 = time.time()
        self.submit(examples)
        needed = {self._inflight[k] for k in map(self.cache.key, examples) if k in self._inflight}
        refs = [ref for ref in self._pending if ref in needed]
        total, done = sum(len(self._pending[ref]) for ref in refs), 0
        for ref in refs:
            chunk = self._pending.pop(ref)
            for ex, (lp, idx) in zip(chunk, self.scorers.collect([ref])[0]):
                self.cache.put(ex, lp, idx)
                self._inflight.pop(self.cache.key(ex), None)
            self.scored += len(chunk)
            done += len(chunk)
            if progress:
                print(f"[teacher-targets] {done}/{total} examples scored", flush=True)
        self.wait_seconds += time.time() - t0
