"""MiniLLM policy-gradient pieces and GRPO against plain-loop float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raykd.losses import (
    clipped_policy_loss,
    discounted_returns,
    group_advantages,
    grpo_loss,
    kl_penalty,
    minillm_loss,
    minillm_rewards,
    reduce_loss,
    reverse_kl,
    single_step_reverse_kl,
    teacher_mixed_importance_weights,
    whiten,
)

B, T, V = 2, 6, 9
# Prompt tokens (0) before the response, padding (0) after it.
MASK = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float64)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def ref_returns(rewards, mask, gamma, length_normalize):
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            total = sum(gamma ** (s - t) * rewards[b, s] for s in range(t, T) if mask[b, s])
            remaining = sum(1 for s in range(t, T) if mask[b, s])
            out[b, t] = total / remaining if length_normalize else total
    return out


def ref_surrogate(logp, old, adv, low, high):
    ratio = math.exp(logp - old)
    return -min(ratio * adv, min(max(ratio, 1 - low), 1 + high) * adv)


def test_minillm_rewards():
    teacher, old = _rand(B, T, seed=1), _rand(B, T, seed=2)
    got = minillm_rewards(teacher, old, MASK)
    np.testing.assert_allclose(got.numpy(), ((teacher - old) * MASK).numpy())


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("length_normalize", [False, True])
def test_discounted_returns(gamma, length_normalize):
    rewards = _rand(B, T, seed=3)
    got = discounted_returns(rewards, MASK, gamma, length_normalize)
    want = ref_returns(rewards.numpy(), MASK.numpy(), gamma, length_normalize)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_whiten():
    x = _rand(B, T, seed=4, scale=3.0) + 2.0
    got = whiten(x, MASK)
    vals = x[MASK.bool()].numpy()
    want = (vals - vals.mean()) / math.sqrt(vals.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(got[MASK.bool()].numpy(), want, rtol=1e-10)
    assert (got[MASK == 0] == 0).all()
    scaled = whiten(x, MASK, shift_mean=False)[MASK.bool()].numpy()
    np.testing.assert_allclose(scaled, want + vals.mean(), rtol=1e-10)


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sum", "global_token"])
@pytest.mark.parametrize("per_sequence_adv", [False, True])
def test_clipped_policy_loss(reduction, per_sequence_adv):
    logp = _rand(B, T, seed=5, scale=0.3).requires_grad_(True)
    old = logp.detach() + _rand(B, T, seed=6, scale=0.4)
    adv = _rand(B, seed=7) if per_sequence_adv else _rand(B, T, seed=7)
    weights = torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loss, metrics = clipped_policy_loss(
        logp,
        old,
        adv,
        MASK,
        clip_eps=0.2,
        clip_eps_high=0.3,
        importance_weights=weights,
        reduction=reduction,
        num_items=11,
    )
    per = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            a = adv[b].item() if per_sequence_adv else adv[b, t].item()
            per[b, t] = weights[b, t].item() * ref_surrogate(
                logp[b, t].item(), old[b, t].item(), a, 0.2, 0.3
            )
    want = reduce_loss(torch.from_numpy(per), MASK, reduction, num_items=11)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert 0.0 <= metrics["clip_frac_low"] <= 1.0 and metrics["policy_loss"] == loss.item()

    def f(lp):
        return clipped_policy_loss(lp, old, adv, MASK, reduction=reduction, num_items=11)[0]

    assert torch.autograd.gradcheck(f, (logp,))


def test_advantages_and_weights_are_detached():
    """Deliberate: no gradient reaches advantages, importance weights or old log-probs."""
    logp = _rand(B, T, seed=8, scale=0.3).requires_grad_(True)
    old = (logp.detach() + 0.1).requires_grad_(True)
    adv = _rand(B, T, seed=9).requires_grad_(True)
    w = torch.ones(B, T, dtype=torch.float64, requires_grad=True)
    loss, _ = clipped_policy_loss(logp, old, adv, MASK, importance_weights=w)
    loss.backward()
    assert adv.grad is None and w.grad is None and old.grad is None
    assert logp.grad is not None and logp.grad.abs().sum() > 0


def test_teacher_mixed_importance_weights():
    log_q = torch.log_softmax(_rand(B, T, V, seed=10), -1)[..., 0]
    log_p = torch.log_softmax(_rand(B, T, V, seed=11), -1)[..., 0]
    for alpha in (0.0, 0.2, 0.5, 1.0):
        got = teacher_mixed_importance_weights(log_q, log_p, alpha)
        q, p = log_q.exp().numpy(), log_p.exp().numpy()
        np.testing.assert_allclose(got.numpy(), q / (alpha * p + (1 - alpha) * q), rtol=1e-12)
        if alpha < 1:
            assert (got <= 1 / (1 - alpha) + 1e-12).all()
    clipped = teacher_mixed_importance_weights(log_q, log_p, 1.0, max_weight=1.5)
    assert clipped.max() <= 1.5


def test_single_step_reverse_kl():
    student, teacher = _rand(B, T, V, seed=12), _rand(B, T, V, seed=13)
    weights = torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = single_step_reverse_kl(student, teacher, MASK, weights=weights, chunk_size=3)
    want = 0.0
    for b in range(B):
        for t in range(T):
            if MASK[b, t]:
                q = torch.softmax(student[b, t], -1).tolist()
                p = torch.softmax(teacher[b, t], -1).tolist()
                kl = sum(qv * (math.log(qv) - math.log(pv)) for qv, pv in zip(q, p))
                want += weights[b, t].item() * kl
    assert got.item() == pytest.approx(want / MASK.sum().item(), rel=1e-12)


def test_minillm_loss_composition():
    """Policy term on A_t = R_{t+1} (future, length-normalised returns) + single-step reverse
    KL + c_lm · L_PT; importance weights multiply both token terms."""
    student = _rand(B, T, V, seed=14).requires_grad_(True)
    teacher = _rand(B, T, V, seed=15)
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    logp = torch.log_softmax(student, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    old = logp.detach() + _rand(B, T, seed=16, scale=0.1)
    teacher_logp = torch.log_softmax(teacher, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    w = teacher_mixed_importance_weights(logp, teacher_logp, 0.2)
    lm = torch.tensor(1.7, dtype=torch.float64)
    loss, metrics = minillm_loss(
        logp,
        old,
        teacher_logp,
        MASK,
        student_logits=student,
        teacher_logits=teacher,
        importance_weights=w,
        gamma=0.95,
        clip_eps=0.2,
        single_step_coef=0.5,
        lm_loss=lm,
        lm_coef=0.3,
    )

    rewards = ((teacher_logp - old) * MASK).detach().numpy()
    returns = ref_returns(rewards, MASK.numpy(), 0.95, True)
    per, single = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            future = returns[b, t + 1] if t + 1 < T and MASK[b, t + 1] else 0.0
            per[b, t] = w[b, t].item() * ref_surrogate(
                logp[b, t].item(), old[b, t].item(), future, 0.2, 0.2
            )
            q = torch.softmax(student[b, t], -1).tolist()
            p = torch.softmax(teacher[b, t], -1).tolist()
            kl = sum(qv * (math.log(qv) - math.log(pv)) for qv, pv in zip(q, p))
            single[b, t] = w[b, t].item() * kl
    m = MASK.numpy()
    want = (per * m).sum() / m.sum() + 0.5 * (single * m).sum() / m.sum() + 0.3 * 1.7
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert metrics["lm"] == pytest.approx(1.7) and metrics["loss"] == loss.item()
    loss.backward()
    assert torch.isfinite(student.grad).all()

    # Without the single-step term the advantage is the full return R_t.
    loss2, _ = minillm_loss(logp, old, teacher_logp, MASK, gamma=0.95)
    per2 = [
        ref_surrogate(logp[b, t].item(), old[b, t].item(), returns[b, t], 0.2, 0.2)
        for b in range(B)
        for t in range(T)
        if MASK[b, t]
    ]
    assert loss2.item() == pytest.approx(sum(per2) / len(per2), rel=1e-10)
    with pytest.raises(ValueError, match="both"):
        minillm_loss(logp, old, teacher_logp, MASK, student_logits=student)


def test_minillm_single_step_gradient_is_exact_reverse_kl_gradient():
    student = _rand(B, T, V, seed=17).requires_grad_(True)
    teacher = _rand(B, T, V, seed=18)
    logp = torch.full((B, T), -1.0, dtype=torch.float64)
    loss, _ = minillm_loss(
        logp, logp, logp, MASK, student_logits=student, teacher_logits=teacher, chunk_size=None
    )
    loss.backward()
    s = student.detach().clone().requires_grad_(True)
    reduce_loss(reverse_kl(s, teacher, MASK, chunk_size=None), MASK).backward()
    torch.testing.assert_close(student.grad, s.grad)


# ---------------------------------------------------------------- GRPO
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages(scale):
    rewards = _rand(12, seed=19)
    got = group_advantages(rewards, 4, scale)
    r = rewards.numpy().reshape(3, 4)
    for i in range(3):
        for j in range(4):
            centred = r[i, j] - r[i].mean()
            std = {"group": r[i].std(ddof=1), "batch": r.std(ddof=1), "none": None}[scale]
            want = centred if std is None else centred / (std + 1e-4)
            assert got[4 * i + j].item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(rewards, 5)


def test_kl_penalty_estimators():
    logp, ref = _rand(B, T, seed=20, scale=0.5), _rand(B, T, seed=21, scale=0.5)
    d = (logp - ref).numpy()
    np.testing.assert_allclose(kl_penalty(logp, ref, "k1").numpy(), d)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k2").numpy(), 0.5 * d**2)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k3").numpy(), np.exp(-d) + d - 1)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_reference(loss_type):
    logp = _rand(B, T, seed=22, scale=0.3).requires_grad_(True)
    old = logp.detach() + _rand(B, T, seed=23, scale=0.4)
    ref = logp.detach() + _rand(B, T, seed=24, scale=0.2)
    adv = torch.tensor([0.8, -1.1], dtype=torch.float64)
    loss, _ = grpo_loss(
        logp,
        old,
        adv,
        MASK,
        epsilon=0.2,
        epsilon_high=0.28,
        beta=0.1,
        ref_logprobs=ref,
        kl_estimator="k2",
        loss_type=loss_type,
        num_items_in_batch=17,
    )
    per = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            d = logp[b, t].item() - ref[b, t].item()
            per[b, t] = ref_surrogate(logp[b, t].item(), old[b, t].item(), adv[b].item(), 0.2, 0.28)
            per[b, t] += 0.1 * 0.5 * d * d
    m = MASK.numpy()
    want = {
        "grpo": np.mean([(per[b] * m[b]).sum() / m[b].sum() for b in range(B)]),
        "bnpo": (per * m).sum() / m.sum(),
        "dr_grpo": (per * m).sum() / (B * T),
        "dapo": (per * m).sum() / 17,
    }[loss_type]
    assert loss.item() == pytest.approx(want, rel=1e-12)

    def f(lp):
        return grpo_loss(
            lp,
            old,
            adv,
            MASK,
            beta=0.1,
            ref_logprobs=ref,
            loss_type=loss_type,
            num_items_in_batch=17,
        )[0]

    assert torch.autograd.gradcheck(f, (logp,))


def test_grpo_argument_errors():
    logp = _rand(B, T, seed=25)
    adv = torch.zeros(B, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        grpo_loss(logp, logp, adv, MASK, loss_type="dapo")
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logp, logp, adv, MASK, beta=0.1)
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
        grpo_loss(logp, logp, adv, MASK, loss_type="ppo")  # type: ignore[arg-type]
