"""Teacher targets that go through the scorer actors (TargetPrefetcher, and TopKCache.fill on
top of it) are the top-k of ``log_softmax(z / tau)`` at the cache's temperature, checked
against a direct forward of the teacher in this process."""

from __future__ import annotations

import pytest
import torch
from topk_checks import assert_same_topk

from raykd.batch import Example
from raykd.models import load_model
from raykd.roles.group import RoleGroup
from raykd.roles.target_cache import TargetPrefetcher, TopKCache
from raykd.roles.teacher import TeacherScorer

pytestmark = pytest.mark.integration

K = 8
EXAMPLES = [
    Example("a", [1, 40, 41, 42], [50, 51, 52, 2]),
    Example("b", [1, 60], [70, 71, 72, 73, 74, 2]),
    Example("c", [1, 80, 81, 82, 83, 84], [90, 2]),
    Example("d", [1, 100, 101], [110, 111, 112, 2]),
    Example("e", [1, 120], [130, 2]),
]


def _direct(model, ex: Example, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``log_softmax(logits[t - 1] / tau)`` at each response position ``t``."""
    ids = torch.tensor([ex.prompt_ids + ex.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    start = len(ex.prompt_ids)
    positions = torch.arange(start, start + len(ex.response_ids))
    return torch.log_softmax(logits[positions - 1] / tau, dim=-1).topk(K, dim=-1)


def _assert_cached_at(cache: TopKCache, model, tau: float) -> None:
    for ex in EXAMPLES:
        got = cache.get(ex)
        assert got is not None, ex.uid
        vals, idx = got
        want_vals, want_idx = _direct(model, ex, tau)
        assert_same_topk(vals, idx, want_vals, want_idx, ex.uid)
        # and not the temperature-1 values (the check can tell the two apart)
        assert (vals - _direct(model, ex, 1.0).values).abs().max() > 0.1, ex.uid


def test_prefetched_and_filled_targets_use_the_cache_temperature(ray_node, tiny_teacher, tmp_path):
    """Mutation: ``TargetPrefetcher.submit`` scoring at 1.0 instead of the cache's
    temperature. At tau = 2 both the prefetcher (submit ahead, then wait) and
    ``TopKCache.fill`` store the tau = 2 top-k of a direct forward of the teacher."""
    tau = 2.0
    model = load_model(tiny_teacher).eval()
    scorers = RoleGroup(
        TeacherScorer, 1, num_cpus=1, make_args=lambda rank: ((tiny_teacher, "float32", 1), {})
    )
    try:
        ahead = TopKCache(tmp_path / "ahead", tiny_teacher, k=K, temperature=tau)
        prefetch = TargetPrefetcher(ahead, scorers, pad_id=0, batch_size=2)
        prefetch.submit(EXAMPLES[2:])  # queued ahead, collected by the wait below
        prefetch.wait(EXAMPLES)
        assert prefetch.scored == len(EXAMPLES)
        _assert_cached_at(ahead, model, tau)

        upfront = TopKCache(tmp_path / "upfront", tiny_teacher, k=K, temperature=tau)
        stats = upfront.fill(EXAMPLES, scorers, pad_id=0, batch_size=2)
        assert stats["scored"] == len(EXAMPLES)
        _assert_cached_at(upfront, model, tau)
    finally:
        scorers.shutdown()
