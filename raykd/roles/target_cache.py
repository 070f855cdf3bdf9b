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

import ray
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
        missing = [ex for ex in examples if not self._path(ex).exists()]
        # Sort by length so padded batches waste little compute.
        missing.sort(key=lambda e: len(e.prompt_ids) + len(e.response_ids))
        batches = [missing[i : i + batch_size] for i in range(0, len(missing), batch_size)]
        done = 0
        # Send one round of batches (one per scorer) at a time and write results as they come.
        width = max(1, len(scorers))
        for r in range(0, len(batches), width):
            round_ = batches[r : r + width]
            refs = [
                actor.topk_targets.remote(examples_to_batch(b, pad_id), self.k, self.temperature)
                for actor, b in zip(scorers.actors, round_)
            ]
            for b, targets in zip(round_, ray.get(refs)):
                for ex, (lp, idx) in zip(b, targets):
                    self.put(ex, lp, idx)
                done += len(b)
            print(f"[teacher-targets] {done}/{len(missing)} examples scored", flush=True)
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
