"""Per-token → scalar reductions."""

from __future__ import annotations

import pytest
import torch

from raykd.losses import REDUCTIONS, reduce_loss


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.float64)
    return x, mask


def _reference(x, mask, reduction, num_items):
    rows = x.tolist()
    m = mask.tolist()
    total = sum(v for r, mr in zip(rows, m) for v, mi in zip(r, mr) if mi)
    count = sum(sum(mr) for mr in m)
    if reduction == "token_mean":
        return total / count
    if reduction == "sequence_mean":
        per_seq = [sum(v for v, mi in zip(r, mr) if mi) / max(sum(mr), 1) for r, mr in zip(rows, m)]
        return sum(per_seq) / len(per_seq)
    if reduction == "sum":
        return total
    return total / num_items


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_match_reference(reduction):
    x, mask = _inputs()
    got = reduce_loss(x, mask, reduction, num_items=21)
    assert got.item() == pytest.approx(_reference(x, mask, reduction, 21), rel=1e-12)
    assert reduce_loss(x, mask.bool(), reduction, num_items=torch.tensor(21)).item() == (
        pytest.approx(got.item(), rel=1e-12)
    )


def test_masked_positions_may_hold_non_finite_values():
    x, mask = _inputs()
    x = x.clone()
    x[mask == 0] = float("nan")
    x[0, 3] = float("inf")
    for reduction in REDUCTIONS:
        assert torch.isfinite(reduce_loss(x, mask, reduction, num_items=5))


def test_sequence_mean_counts_empty_sequences_as_zero():
    x = torch.tensor([[2.0, 4.0], [7.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert reduce_loss(x, mask, "sequence_mean").item() == pytest.approx(1.5)


def test_empty_mask_is_zero_with_zero_gradient():
    x = torch.randn(2, 3, requires_grad=True)
    loss = reduce_loss(x, torch.zeros(2, 3), "token_mean")
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()


def test_errors_name_the_problem():
    x, mask = _inputs()
    with pytest.raises(ValueError, match="num_items"):
        reduce_loss(x, mask, "global_token")
    with pytest.raises(ValueError, match="unknown reduction 'mean'"):
        reduce_loss(x, mask, "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask shape"):
        reduce_loss(x, mask[:, :2])
