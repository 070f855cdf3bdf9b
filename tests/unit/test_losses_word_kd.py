"""Hinton word-level KD and TAID against float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raykd.losses import (
    OBJECTIVES,
    TAIDSchedule,
    forward_kl,
    hinton_kd_loss,
    jsd,
    reduce_loss,
    taid_loss,
    topk_jsd,
)

B, T, V = 2, 5, 11


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def np_log_softmax(x):
    return x - x.max() - math.log(np.exp(x - x.max()).sum())


def make_inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(B, T, V, generator=g)).to(dtype)
    teacher = (2 * torch.randn(B, T, V, generator=g)).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.float32)
    return student, teacher, targets, mask


def ref_reduce(per_token, mask, reduction, num_items=None):
    m = mask.numpy()
    if reduction == "token_mean":
        return (per_token * m).sum() / m.sum()
    if reduction == "sequence_mean":
        return np.mean([(per_token[b] * m[b]).sum() / max(m[b].sum(), 1) for b in range(len(m))])
    if reduction == "sum":
        return (per_token * m).sum()
    return (per_token * m).sum() / num_items


def ref_hinton(student, teacher, targets, mask, alpha, tau, reduction, num_items=None):
    """α τ² R[KL(p_T^τ ‖ p_S^τ)] + (1 − α) R[CE] with numpy loops."""
    zs, zt = student.numpy(), teacher.numpy()
    kd, ce = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            p, q = np_softmax(zt[b, t] / tau), np_softmax(zs[b, t] / tau)
            kd[b, t] = sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in range(V))
            ce[b, t] = -np_log_softmax(zs[b, t])[targets[b, t]]
    kd_r = ref_reduce(kd, mask, reduction, num_items)
    ce_r = ref_reduce(ce, mask, reduction, num_items)
    return alpha * tau**2 * kd_r + (1 - alpha) * ce_r, kd_r, ce_r


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sum", "global_token"])
@pytest.mark.parametrize(("alpha", "tau"), [(0.5, 1.0), (0.7, 2.0), (1.0, 3.0), (0.0, 2.0)])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_hinton_matches_reference(reduction, alpha, tau, chunk_size):
    student, teacher, targets, mask = make_inputs()
    loss, metrics = hinton_kd_loss(
        student,
        targets,
        mask,
        teacher_logits=teacher,
        alpha=alpha,
        temperature=tau,
        reduction=reduction,
        num_items=13,
        chunk_size=chunk_size,
    )
    want, kd, ce = ref_hinton(student, teacher, targets, mask, alpha, tau, reduction, 13)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert metrics["kd"] == pytest.approx(kd, rel=1e-10)
    assert metrics["ce"] == pytest.approx(ce, rel=1e-10)
    assert metrics["loss"] == pytest.approx(want, rel=1e-10)


def test_hinton_temperature_squared_scaling_is_pinned():
    """raykd multiplies the soft term by τ² (Hinton); the divergence itself (and TRL's GKD
    loss) does not."""
    student, teacher, targets, mask = make_inputs(seed=1)
    tau = 2.5
    loss, _ = hinton_kd_loss(
        student, targets, mask, teacher_logits=teacher, alpha=1.0, temperature=tau
    )
    plain = reduce_loss(forward_kl(student, teacher, mask, temperature=tau), mask)
    assert loss.item() == pytest.approx(tau**2 * plain.item(), rel=1e-12)


def test_hinton_with_divergence_kwargs_and_topk_targets():
    student, teacher, targets, mask = make_inputs(seed=2)
    logprobs, indices = torch.log_softmax(teacher / 2.0, -1).topk(4, dim=-1)
    loss, metrics = hinton_kd_loss(
        student,
        targets,
        mask,
        teacher_topk=(logprobs, indices),
        alpha=0.6,
        temperature=2.0,
        divergence="jsd",
        divergence_kwargs={"beta": 0.3},
        chunk_size=4,
    )
    kd = reduce_loss(topk_jsd(student, logprobs, indices, mask, beta=0.3, temperature=2.0), mask)
    _, _, ce = ref_hinton(student, teacher, targets, mask, 0.6, 2.0, "token_mean")
    assert metrics["kd"] == pytest.approx(kd.item(), rel=1e-10)
    assert loss.item() == pytest.approx(0.6 * 4.0 * kd.item() + 0.4 * ce, rel=1e-10)
    full, _ = hinton_kd_loss(
        student,
        targets,
        mask,
        teacher_logits=teacher,
        divergence="jsd",
        divergence_kwargs={"beta": 0.3},
        temperature=2.0,
    )
    want = 0.5 * 4 * reduce_loss(jsd(student, teacher, mask, beta=0.3, temperature=2.0), mask)
    assert full.item() == pytest.approx(want.item() + 0.5 * ce, rel=1e-10)


def test_hinton_fused_gradient_equals_direct_gradcheck():
    student, teacher, targets, mask = make_inputs(seed=3)
    grads = []
    for chunk_size in (None, 2):
        s = student.clone().requires_grad_(True)
        loss, _ = hinton_kd_loss(
            s,
            targets,
            mask,
            teacher_logits=teacher,
            alpha=0.3,
            temperature=2.0,
            reduction="sequence_mean",
            chunk_size=chunk_size,
        )
        loss.backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)

    small = student[:, :3, :6].clone().requires_grad_(True)
    small_targets = targets[:, :3] % 6

    def f(s):
        return hinton_kd_loss(
            s,
            small_targets,
            mask[:, :3],
            teacher_logits=teacher[:, :3, :6],
            alpha=0.4,
            temperature=1.5,
            chunk_size=None,
        )[0]

    assert torch.autograd.gradcheck(f, (small,))


@pytest.mark.parametrize("divergence", sorted(OBJECTIVES))
@pytest.mark.parametrize("topk", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_hinton_chunked_equals_direct_for_every_divergence(divergence, topk, alpha):
    """The chunked path (closed-form fused gradients where available, autograd per chunk
    otherwise) matches plain autograd on all positions, in value, metrics and gradient."""
    student, teacher, targets, mask = make_inputs(seed=6)
    teacher_kwargs = (
        {"teacher_topk": tuple(torch.log_softmax(teacher / 1.5, -1).topk(4, dim=-1))}
        if topk
        else {"teacher_logits": teacher}
    )
    results = []
    for chunk_size in (None, 3):
        s = student.clone().requires_grad_(True)
        loss, metrics = hinton_kd_loss(
            s,
            targets,
            mask,
            **teacher_kwargs,
            alpha=alpha,
            temperature=1.5,
            divergence=divergence,
            reduction="sequence_mean",
            chunk_size=chunk_size,
        )
        loss.backward()
        results.append((loss.detach(), metrics, s.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-10)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-10, atol=1e-12)


def test_hinton_argument_errors():
    student, teacher, targets, mask = make_inputs()
    topk = torch.log_softmax(teacher, -1).topk(3, dim=-1)
    with pytest.raises(ValueError, match="exactly one"):
        hinton_kd_loss(student, targets, mask)
    with pytest.raises(ValueError, match="exactly one"):
        hinton_kd_loss(student, targets, mask, teacher_logits=teacher, teacher_topk=tuple(topk))
    with pytest.raises(ValueError, match="'jsd' has no parameter 'lam'"):
        hinton_kd_loss(
            student,
            targets,
            mask,
            teacher_logits=teacher,
            divergence="jsd",
            divergence_kwargs={"lam": 0.1},
        )
    with pytest.raises(ValueError, match="no parameter 'temperature'"):
        hinton_kd_loss(
            student, targets, mask, teacher_logits=teacher, divergence_kwargs={"temperature": 2}
        )
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        hinton_kd_loss(student, targets, mask, teacher_logits=teacher, divergence="kl")
    with pytest.raises(ValueError, match="alpha"):
        hinton_kd_loss(student, targets, mask, teacher_logits=teacher, alpha=1.5)


# ---------------------------------------------------------------- TAID
def ref_taid(student, teacher, mask, t, tau):
    zs, zt = student.detach().numpy(), teacher.numpy()
    out = np.zeros((B, T))
    for b in range(B):
        for i in range(T):
            if mask[b, i]:
                p_t = np_softmax(((1 - t) * zs[b, i] + t * zt[b, i]) / tau)
                q = np_softmax(zs[b, i] / tau)
                out[b, i] = sum(p_t[v] * (math.log(p_t[v]) - math.log(q[v])) for v in range(V))
    return out


@pytest.mark.parametrize("t", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_taid_matches_reference(t, tau, chunk_size):
    student, teacher, _, mask = make_inputs(seed=4)
    got = taid_loss(student, teacher, mask, t=t, temperature=tau, chunk_size=chunk_size)
    np.testing.assert_allclose(got.numpy(), ref_taid(student, teacher, mask, t, tau), atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_taid_target_is_stop_gradient(chunk_size):
    """∂/∂z_S KL(p_t ‖ q_S) = (q_S − p_t)/τ: no gradient through the target's student part."""
    student, teacher, _, mask = make_inputs(seed=5)
    t, tau = 0.6, 2.0
    s = student.clone().requires_grad_(True)
    taid_loss(s, teacher, mask, t=t, temperature=tau, chunk_size=chunk_size).sum().backward()
    p_t = torch.softmax(((1 - t) * student + t * teacher) / tau, -1)
    q = torch.softmax(student / tau, -1)
    torch.testing.assert_close(s.grad, (q - p_t) / tau * mask.unsqueeze(-1).double())


def ref_schedule(losses, t_start, t_end, alpha, beta, total):
    """Algorithm 1 of the TAID paper written out step by step."""
    t, m, prev, ts = t_start, 0.0, None, []
    for n, loss in enumerate(losses, start=1):
        t_lin = t_start + (t_end - t_start) * min(n / total, 1.0)
        if prev is not None:
            m = beta * m + (1 - beta) * (prev - loss) / (prev + 1e-15)
            t = min(t_end, max(t_lin, t + alpha * (1 / (1 + math.exp(-m))) * (1 - t)))
        prev = loss
        ts.append(t)
    return ts


def test_taid_schedule_matches_algorithm():
    losses = [5.0 * math.exp(-0.05 * n) + 0.1 * math.sin(n) for n in range(60)]
    sched = TAIDSchedule(t_start=0.4, t_end=0.95, alpha=0.05, beta=0.9, total_steps=50)
    got = [sched.step(x) for x in losses]
    want = ref_schedule(losses, 0.4, 0.95, 0.05, 0.9, 50)
    assert got == pytest.approx(want, rel=1e-12)
    assert all(b >= a for a, b in zip(got, got[1:]))
    assert got[-1] == pytest.approx(0.95)
    # Improving losses push t ahead of the linear schedule.
    assert got[10] > sched.linear_t(11)


def test_taid_schedule_non_adaptive_and_state_roundtrip():
    linear = TAIDSchedule(t_start=0.2, t_end=1.0, total_steps=4, adaptive=False)
    assert [linear.step(1.0) for _ in range(5)] == pytest.approx([0.4, 0.6, 0.8, 1.0, 1.0])
    a = TAIDSchedule(alpha=0.1, beta=0.5, total_steps=100)
    for x in (3.0, 2.0, 1.5):
        a.step(x)
    b = TAIDSchedule(alpha=0.1, beta=0.5, total_steps=100)
    b.load_state_dict(a.state_dict())
    assert a.step(1.0) == b.step(1.0)
    with pytest.raises(ValueError, match="t_start"):
        TAIDSchedule(t_start=0.9, t_end=0.5)
    with pytest.raises(ValueError, match="non-finite"):
        a.step(float("nan"))
