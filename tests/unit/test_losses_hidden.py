"""Intermediate-layer matching and teacher ensembles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raykd.losses import (
    HiddenProjector,
    ensemble_teacher_logprobs,
    forward_kl,
    hidden_state_loss,
    uniform_layer_map,
)

B, T = 2, 4
MASK = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.float32)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ref_hidden(hs, ht, mask, kind, reduction):
    per = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            s, h = hs[b, t], ht[b, t]
            if kind == "mse":
                per[b, t] = sum((x - y) ** 2 for x, y in zip(s, h)) / len(h)
            else:
                dot = sum(x * y for x, y in zip(s, h))
                per[b, t] = 1 - dot / (
                    math.sqrt(sum(x * x for x in s)) * math.sqrt(sum(y * y for y in h))
                )
    m = mask.numpy()
    if reduction == "token_mean":
        return (per * m).sum() / m.sum()
    return np.mean([(per[b] * m[b]).sum() / m[b].sum() for b in range(B)])


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_hidden_state_loss_with_projection(kind, reduction):
    proj = HiddenProjector(3, 5).double()
    hs, ht = _rand(B, T, 3, seed=1), _rand(B, T, 5, seed=2)
    got = hidden_state_loss(hs, ht, MASK, proj, kind, reduction=reduction)
    projected = proj(hs).detach().numpy()
    assert got.item() == pytest.approx(
        ref_hidden(projected, ht.numpy(), MASK, kind, reduction), rel=1e-10
    )
    got.backward()
    assert proj.proj.weight.grad is not None

    hs = hs.requires_grad_(True)

    def f(h):
        return hidden_state_loss(h, ht[..., :3], MASK, None, kind, reduction=reduction)

    assert torch.autograd.gradcheck(f, (hs,))


def test_hidden_state_loss_errors():
    with pytest.raises(ValueError, match="projection"):
        hidden_state_loss(_rand(B, T, 3), _rand(B, T, 5), MASK)
    with pytest.raises(ValueError, match="kind"):
        hidden_state_loss(_rand(B, T, 3), _rand(B, T, 3), MASK, kind="l1")  # type: ignore[arg-type]


def test_uniform_layer_map():
    assert uniform_layer_map(4, 12) == [2, 5, 8, 11]
    assert uniform_layer_map(3, 8) == [2, 5, 7]
    assert uniform_layer_map(6, 6) == list(range(6))
    assert uniform_layer_map(4, 2) == [0, 0, 1, 1]
    with pytest.raises(ValueError):
        uniform_layer_map(0, 4)


def test_ensemble_teacher_logprobs():
    teachers = [_rand(B, T, 7, seed=s) for s in (3, 4, 5)]
    weights = [2.0, 1.0, 1.0]
    tau = 2.0
    got = ensemble_teacher_logprobs(teachers, weights, temperature=tau)
    for b in range(B):
        for t in range(T):
            mix = np.zeros(7)
            for z, w in zip(teachers, weights):
                e = np.exp(z[b, t].numpy() / tau)
                mix += (w / 4.0) * e / e.sum()
            np.testing.assert_allclose(got[b, t].numpy(), np.log(mix), rtol=1e-12)
    # A single teacher (or zero weight on the others) reproduces that teacher.
    one = ensemble_teacher_logprobs(teachers, [0.0, 1.0, 0.0])
    torch.testing.assert_close(one, torch.log_softmax(teachers[1], -1))
    # Usable as full teacher targets: equal teachers give the same loss as one teacher.
    student = _rand(B, T, 7, seed=6)
    torch.testing.assert_close(
        forward_kl(student, ensemble_teacher_logprobs([teachers[0]] * 2), MASK),
        forward_kl(student, teachers[0], MASK),
    )
    with pytest.raises(ValueError, match="weights"):
        ensemble_teacher_logprobs(teachers, [1.0, -1.0, 0.0])
    with pytest.raises(ValueError, match="weights"):
        ensemble_teacher_logprobs(teachers, [1.0])
