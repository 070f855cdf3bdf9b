"""Boundary tests of the learner-side policy losses on a real tiny model, each against an
independent computation: MiniLLM's importance weights (``reverse_kl_pg_loss``) and Dr. GRPO's
``max_completion_length`` normalisation (``grpo_policy_loss``)."""

from __future__ import annotations

import pytest
import torch

from raykd.algorithms.grpo import grpo_policy_loss
from raykd.algorithms.onpolicy import reverse_kl_pg_loss
from raykd.batch import Example, examples_to_batch
from raykd.losses import clipped_policy_loss
from raykd.models import build_tiny_model, build_tiny_tokenizer

EXAMPLES = [
    Example("a", [1, 40, 41], [50, 51, 52, 53, 2]),
    Example("b", [1, 60, 61, 62, 63], [70, 71, 2]),
    Example("c", [1, 80], [90, 91, 92, 93, 94, 95, 2]),
]


@pytest.fixture(scope="module")
def model():
    m = build_tiny_model(build_tiny_tokenizer(), seed=0, num_layers=2, hidden_size=32)
    m.model.norm.weight.data.mul_(4.0)
    return m


def _aligned_logprobs(model, batch, dtype=torch.float32) -> torch.Tensor:
    """``log p(x_t | x_<t)`` for t >= 1, ``[B, T - 1]``, by a direct gather (no raykd code)."""
    m = model.to(dtype)
    try:
        with torch.no_grad():
            logits = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        model.to(torch.float32)
    lp = torch.log_softmax(logits[:, :-1].to(dtype), dim=-1)
    return lp.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def _micro_batch(model, seed=0):
    """A micro-batch as the controller builds it: [B, T] tensors, 0 off the loss mask, with
    old log-probs off the current policy (ratios around 1, some outside the clip range)."""
    g = torch.Generator().manual_seed(seed)
    batch = examples_to_batch(EXAMPLES, pad_id=0)
    mask = batch.loss_mask
    current = torch.zeros_like(mask)
    current[:, 1:] = _aligned_logprobs(model, batch)
    old = (current + 0.3 * torch.randn(mask.shape, generator=g)) * mask
    return (
        batch,
        {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "loss_mask": mask,
            "old_logprobs": old,
        },
        g,
    )


# ----------------------------------------------------------------------------- MiniLLM


def test_reverse_kl_pg_loss_applies_the_importance_weights(model):
    """Mutation: ``reverse_kl_pg_loss`` ignoring ``mb["weights"]`` (teacher-mixed sampling's
    per-token ``w_t = q(y_t) / p~(y_t)``). Its value equals ``clipped_policy_loss`` with the
    weights on independently computed log-probs, and a float64 evaluation of
    ``mean_t w_t * -min(rho A, clip(rho) A)``; it differs clearly from the unweighted loss."""
    clip_eps = 0.2
    batch, mb, g = _micro_batch(model)
    mask = mb["loss_mask"]
    mb["advantages"] = torch.randn(mask.shape, generator=g) * mask
    # Weights far from 1 and correlated with the advantage sign, so dropping them moves the
    # loss a lot (a mixture-sampling weight lies in [0, 1/(1 - alpha)]).
    mb["weights"] = torch.where(mb["advantages"] > 0, 1.8, 0.25) * mask

    loss, metrics = reverse_kl_pg_loss(model, mb, clip_eps=clip_eps, lm_coef=0.0)

    lp = _aligned_logprobs(model, batch)
    m, old, adv, w = (mb[k][:, 1:] for k in ("loss_mask", "old_logprobs", "advantages", "weights"))
    ref, _ = clipped_policy_loss(lp, old, adv, m, clip_eps=clip_eps, importance_weights=w)
    unweighted, _ = clipped_policy_loss(lp, old, adv, m, clip_eps=clip_eps)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-6)

    lp64 = _aligned_logprobs(model, batch, torch.float64)
    ratio = torch.exp(lp64 - old.double())
    a = adv.double()
    per_token = -torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    want = (w.double() * per_token * m).sum() / m.sum()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
    assert metrics["pg"] == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
    # the weights matter here: the unweighted loss is far from the weighted one
    assert abs(unweighted.item() - want.item()) > 0.1 * abs(want.item()) + 1e-3

    # and the gradient is weighted too: all-zero weights leave no policy gradient
    model.zero_grad()
    zero = dict(mb, weights=torch.zeros_like(mask))
    reverse_kl_pg_loss(model, zero, clip_eps=clip_eps, lm_coef=0.0)[0].backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())
    model.zero_grad()


# ----------------------------------------------------------------------------- Dr. GRPO


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_dr_grpo_normalises_by_batch_size_times_max_completion_length(model, beta):
    """Mutation: Dr. GRPO's ``max_completion_length`` not passed on or not used (the loss
    then divides by the micro-batch's padded width instead). Against float64:
    ``sum_b sum_t m * l_t / (B * max_completion_length)``, with
    ``l_t = -min(rho A_b, clip(rho, 1 - eps, 1 + eps_high) A_b) + beta * k3``."""
    eps, eps_high, max_len = 0.2, 0.28, 32
    batch, mb, g = _micro_batch(model, seed=1)
    mb["advantages"] = torch.tensor([1.0, -0.5, 0.75])  # one per sequence
    ref_lp = torch.zeros_like(mb["loss_mask"])
    ref_lp[:, 1:] = _aligned_logprobs(model, batch)
    mb["ref_logprobs"] = (ref_lp + 0.2 * torch.randn(ref_lp.shape, generator=g)) * mb["loss_mask"]
    kwargs = dict(epsilon=eps, epsilon_high=eps_high, kl_estimator="k3", loss_type="dr_grpo")

    loss, _ = grpo_policy_loss(model, mb, beta=beta, max_completion_length=max_len, **kwargs)

    m = mb["loss_mask"][:, 1:].double()
    lp64 = _aligned_logprobs(model, batch, torch.float64)
    ratio = torch.exp(lp64 - mb["old_logprobs"][:, 1:].double())
    a = mb["advantages"].double().unsqueeze(-1)
    per_token = -torch.min(ratio * a, ratio.clamp(1 - eps, 1 + eps_high) * a)
    if beta:
        d = lp64 - mb["ref_logprobs"][:, 1:].double()
        per_token = per_token + beta * (torch.exp(-d) + d - 1)
    total = (per_token * m).sum()
    bsz, width = m.shape
    assert max_len != width  # the two normalisations differ on this batch
    want = total / (bsz * max_len)
    assert loss.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-7)
    assert abs(loss.item() - (total / (bsz * width)).item()) > 1e-3

    # the default (no max_completion_length) is the padded completion width T
    default, _ = grpo_policy_loss(model, mb, beta=beta, **kwargs)
    assert default.item() == pytest.approx((total / (bsz * width)).item(), rel=1e-4, abs=1e-7)
