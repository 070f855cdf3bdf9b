"""Top-k + tail-bucket divergences: reference, exactness at k = V, approximation error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raykd.losses import OBJECTIVES, TOPK_OBJECTIVES, topk_bucket_logprobs, topk_forward_kl

B, T, V = 2, 5, 11
NAMES_PARAMS = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("skew_forward_kl", {"lam": 0.1}),
    ("skew_reverse_kl", {"lam": 0.1}),
    ("tvd", {}),
    ("cross_entropy", {}),
]
IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items())}" for n, p in NAMES_PARAMS]
# f-divergences: coarse-graining can only lower them (data-processing inequality).
F_DIVERGENCES = [c for c in NAMES_PARAMS if c[0] != "cross_entropy"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def np_kl(a, b):
    return sum(a_i * (math.log(a_i) - math.log(b_i)) for a_i, b_i in zip(a, b) if a_i > 0)


def ref_row(name, q, p, beta=0.5, lam=0.1):
    if name == "forward_kl" or (name == "jsd" and beta == 0.0):
        return np_kl(p, q)
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return np_kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
    if name == "skew_forward_kl":
        return np_kl(p, lam * p + (1 - lam) * q)
    if name == "skew_reverse_kl":
        return np_kl(q, lam * q + (1 - lam) * p)
    if name == "tvd":
        return 0.5 * float(np.abs(p - q).sum())
    if name == "cross_entropy":
        return -sum(p_i * math.log(q_i) for p_i, q_i in zip(p, q) if p_i > 0)
    raise AssertionError(name)


def teacher_topk(teacher_logits, k, tau):
    """Top-k targets as the teacher role computes them: log-probs at τ, top-k by value."""
    logprobs = torch.log_softmax(teacher_logits / tau, dim=-1)
    values, indices = logprobs.topk(k, dim=-1)
    return values, indices


def ref_bucketed(name, student, teacher, mask, k, tau, **params):
    """Independent reference: numpy buckets (k tokens + the rest) of the full distributions."""
    zs, zt = student.double().numpy(), teacher.double().numpy()
    out = np.zeros(zs.shape[:-1])
    for idx in np.ndindex(*out.shape):
        if not mask[idx]:
            continue
        q, p = np_softmax(zs[idx] / tau), np_softmax(zt[idx] / tau)
        top = np.argsort(-p, kind="stable")[:k]
        rest = np.setdiff1d(np.arange(len(p)), top)
        qb = np.append(q[top], q[rest].sum()) if len(rest) else q[top]
        pb = np.append(p[top], p[rest].sum()) if len(rest) else p[top]
        out[idx] = ref_row(name, qb, pb, **params)
    return out


def make_inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(B, T, V, generator=g)).to(dtype)
    teacher = (2 * torch.randn(B, T, V, generator=g)).to(dtype)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[0, 0] = 0.0
    mask[1, 1] = 1.0
    return student, teacher, mask


@pytest.mark.parametrize(("name", "params"), NAMES_PARAMS, ids=IDS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 4])
def test_matches_bucket_reference(name, params, tau, k):
    student, teacher, mask = make_inputs(dtype=torch.float32)
    logprobs, indices = teacher_topk(teacher, k, tau)
    got = TOPK_OBJECTIVES[name](
        student, logprobs, indices, mask, temperature=tau, chunk_size=3, **params
    )
    want = ref_bucketed(name, student, teacher, mask, k, tau, **params)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=2e-6)
    assert (got[mask == 0] == 0).all()


@pytest.mark.parametrize(("name", "params"), NAMES_PARAMS, ids=IDS)
def test_k_equal_vocab_is_exact(name, params):
    student, teacher, mask = make_inputs(seed=1)
    logprobs, indices = teacher_topk(teacher, V, 2.0)
    got = TOPK_OBJECTIVES[name](student, logprobs, indices, mask, temperature=2.0, **params)
    full = OBJECTIVES[name](student, teacher, mask, temperature=2.0, **params)
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "params"), F_DIVERGENCES, ids=IDS[: len(F_DIVERGENCES)])
def test_bucketed_never_exceeds_full_and_grows_with_k(name, params):
    """Data-processing inequality; nested top-k partitions refine as k grows, so the bucketed
    value is non-decreasing in k and reaches the full value at k = V."""
    student, teacher, mask = make_inputs(seed=2)
    full = OBJECTIVES[name](student, teacher, mask, **params)
    previous = torch.zeros_like(full)
    for k in range(1, V + 1):
        logprobs, indices = teacher_topk(teacher, k, 1.0)
        got = TOPK_OBJECTIVES[name](student, logprobs, indices, mask, **params)
        assert (got <= full + 1e-12).all(), k
        assert (got >= previous - 1e-12).all(), k
        previous = got
    torch.testing.assert_close(previous, full, rtol=1e-10, atol=1e-12)


def test_forward_kl_gap_is_tail_mass_times_within_tail_kl():
    """Chain rule: KL_full − KL_bucketed = p_R · KL(p(·|R) ‖ q(·|R)) (numpy reference)."""
    student, teacher, mask = make_inputs(seed=3)
    k = 3
    logprobs, indices = teacher_topk(teacher, k, 1.0)
    gap = (
        OBJECTIVES["forward_kl"](student, teacher, mask)
        - topk_forward_kl(student, logprobs, indices, mask)
    ).numpy()
    zs, zt = student.numpy(), teacher.numpy()
    for idx in np.ndindex(B, T):
        if not mask[idx]:
            continue
        q, p = np_softmax(zs[idx]), np_softmax(zt[idx])
        rest = np.setdiff1d(np.arange(V), indices[idx].numpy())
        p_r, q_r = p[rest].sum(), q[rest].sum()
        assert gap[idx] == pytest.approx(p_r * np_kl(p[rest] / p_r, q[rest] / q_r), rel=1e-9)


def test_bucket_logprobs_are_normalised_and_tail_is_stable():
    student, teacher, _ = make_inputs(seed=4, dtype=torch.float32)
    logprobs, indices = teacher_topk(teacher, 3, 1.0)
    log_q, log_p = topk_bucket_logprobs(student, logprobs, indices)
    assert log_q.shape == (B, T, 4)
    torch.testing.assert_close(log_q.exp().sum(-1), torch.ones(B, T))
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(B, T))
    # Teacher top-k mass rounding to >= 1: the tail is floored (finite), not NaN.
    peaked = torch.full((1, 1, 2), 0.0)
    _, log_p = topk_bucket_logprobs(
        torch.zeros(1, 1, V), peaked + 1e-7, torch.tensor([[[0, 1]]]), 1.0
    )
    assert torch.isfinite(log_p).all() and log_p[..., -1] < -15
    # A student whose tail is far below float32 resolution of 1 − Σ q_top.
    s = torch.zeros(1, 1, V)
    s[..., 0] = 40.0
    log_q, _ = topk_bucket_logprobs(s, torch.tensor([[[-1e-6]]]), torch.tensor([[[0]]]))
    assert log_q[..., -1].item() == pytest.approx(math.log(V - 1) - 40.0, rel=1e-5)


@pytest.mark.parametrize(("name", "params"), NAMES_PARAMS, ids=IDS)
def test_chunked_equals_direct_and_gradcheck(name, params):
    student, teacher, mask = make_inputs(seed=5)
    logprobs, indices = teacher_topk(teacher, 3, 1.5)
    fn = TOPK_OBJECTIVES[name]
    weights = torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for chunk_size in (None, 2):
        s = student.clone().requires_grad_(True)
        out = fn(s, logprobs, indices, mask, temperature=1.5, chunk_size=chunk_size, **params)
        (out * weights).sum().backward()
        grads.append((out.detach(), s.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-12)

    small = student[:1, :3, :7].clone().requires_grad_(True)
    lp, ix = teacher_topk(teacher[:1, :3, :7], 2, 1.5)

    def f(s):
        return fn(s, lp, ix, mask[:1, :3], temperature=1.5, chunk_size=None, **params)

    assert torch.autograd.gradcheck(f, (small,))


@pytest.mark.parametrize(("name", "params"), NAMES_PARAMS, ids=IDS)
def test_k_equal_vocab_fused_gradient_equals_full(name, params):
    """No tail bucket at k = V: the fused chunked gradient equals the full objective's."""
    student, teacher, mask = make_inputs(seed=6)
    logprobs, indices = teacher_topk(teacher, V, 1.3)
    s_topk = student.clone().requires_grad_(True)
    s_full = student.clone().requires_grad_(True)
    fn_topk, fn_full = TOPK_OBJECTIVES[name], OBJECTIVES[name]
    fn_topk(
        s_topk, logprobs, indices, mask, temperature=1.3, chunk_size=3, **params
    ).sum().backward()
    fn_full(s_full, teacher, mask, temperature=1.3, chunk_size=None, **params).sum().backward()
    torch.testing.assert_close(s_topk.grad, s_full.grad, rtol=1e-9, atol=1e-12)


def test_shape_errors():
    student, teacher, mask = make_inputs()
    logprobs, indices = teacher_topk(teacher, 3, 1.0)
    with pytest.raises(ValueError, match="top-k"):
        topk_forward_kl(student, logprobs[..., :2], indices, mask)
    with pytest.raises(ValueError, match="top-k"):
        topk_forward_kl(student[:, :-1], logprobs, indices, mask)
