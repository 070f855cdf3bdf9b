"""Comparing top-k teacher targets, shared by the unit and integration tests."""

import torch


def assert_same_topk(vals, idx, want_vals, want_idx, what) -> None:
    """Same top-k targets up to the order of near-tied entries (a batched, padded forward and
    an unbatched one differ by float noise): the same values in order, and the same token
    set with each token's log-prob equal in both."""
    torch.testing.assert_close(vals, want_vals, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")
    order, want_order = idx.long().argsort(-1), want_idx.long().argsort(-1)
    tokens, want_tokens = idx.long().gather(-1, order), want_idx.long().gather(-1, want_order)
    assert tokens.tolist() == want_tokens.tolist(), what
    torch.testing.assert_close(vals.gather(-1, order), want_vals.gather(-1, want_order),
                               atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")  # fmt: skip
