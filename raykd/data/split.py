"""Deterministic, seedable train/eval splits that do not depend on ``PYTHONHASHSEED``."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

from raykd.data.records import TaskRecord

T = TypeVar("T")


def stable_fraction(key: str, seed: int = 0) -> float:
    """Map ``(seed, key)`` to a float in ``[0, 1)``, identically on every machine and run."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def check_fraction(eval_fraction: float) -> None:
    """Raise ``ValueError`` unless ``0 <= eval_fraction < 1``."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")


def split_by_uid(
    records: Sequence[TaskRecord], eval_fraction: float = 0.2, seed: int = 0
) -> tuple[list[TaskRecord], list[TaskRecord]]:
    """Split records by ranking ``stable_fraction(uid, seed)``; the lowest ranks go to eval.

    Ranking (rather than thresholding each hash) gives exactly ``round(eval_fraction * n)``
    eval records, at least one when ``eval_fraction > 0`` and ``n >= 2``, which matters
    for small files.  Both splits keep the input order.
    """
    check_fraction(eval_fraction)
    n = len(records)
    n_eval = round(eval_fraction * n)
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    ranked = sorted(range(n), key=lambda i: (stable_fraction(records[i].uid, seed), i))
    eval_idx = set(ranked[:n_eval])
    train = [r for i, r in enumerate(records) if i not in eval_idx]
    held_out = [r for i, r in enumerate(records) if i in eval_idx]
    return train, held_out


def seeded_order(items: Sequence[T], keys: Sequence[str], seed: int) -> list[T]:
    """Return ``items`` sorted by ``stable_fraction(key, seed)``: a reproducible shuffle."""
    ranked = sorted(range(len(items)), key=lambda i: (stable_fraction(keys[i], seed), i))
    return [items[i] for i in ranked]
