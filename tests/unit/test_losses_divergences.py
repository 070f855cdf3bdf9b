"""Full-logit divergences against an independent float64 numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raykd.losses import OBJECTIVES, forward_kl, jsd, reduce_loss, reverse_kl

B, T, V = 2, 5, 11


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: intra-op threads only add scheduling latency on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 1.0}),
    ("skew_forward_kl", {"lam": 0.1}),
    ("skew_forward_kl", {"lam": 0.0}),
    ("skew_reverse_kl", {"lam": 0.3}),
    ("tvd", {}),
    ("cross_entropy", {}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items())}" for n, p in CASES]


# ---------------------------------------------------------------- numpy reference (per row)
def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def np_kl(a: np.ndarray, b: np.ndarray) -> float:
    total = 0.0
    for a_i, b_i in zip(a, b):
        if a_i > 0:
            total += a_i * (math.log(a_i) - math.log(b_i))
    return total


def ref_row(name: str, q: np.ndarray, p: np.ndarray, beta=0.5, lam=0.1) -> float:
    """Divergence between student q and teacher p, given as probability vectors."""
    if name == "forward_kl":
        return np_kl(p, q)
    if name == "reverse_kl":
        return np_kl(q, p)
    if name == "jsd":
        if beta == 0.0:
            return np_kl(p, q)
        if beta == 1.0:
            return np_kl(q, p)
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


def ref_per_token(name, student, teacher, mask, tau, **params) -> np.ndarray:
    zs, zt = student.detach().double().numpy(), teacher.detach().double().numpy()
    m = np.ones(zs.shape[:-1]) if mask is None else mask.double().numpy()
    out = np.zeros(zs.shape[:-1])
    for idx in np.ndindex(*out.shape):
        if m[idx]:
            out[idx] = ref_row(name, np_softmax(zs[idx] / tau), np_softmax(zt[idx] / tau), **params)
    return out


def make_inputs(seed=0, dtype=torch.float32, shape=(B, T, V)):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(shape, generator=g)).to(dtype)
    teacher = (2 * torch.randn(shape, generator=g)).to(dtype)
    mask = (torch.rand(shape[:-1], generator=g) > 0.3).float()
    mask[0, 0] = 0.0
    mask[-1, -1] = 1.0
    return student, teacher, mask


# ---------------------------------------------------------------- values
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [None, 3, 256])
def test_matches_reference(name, params, tau, chunk_size):
    student, teacher, mask = make_inputs()
    got = OBJECTIVES[name](student, teacher, mask, temperature=tau, chunk_size=chunk_size, **params)
    want = ref_per_token(name, student, teacher, mask, tau, **params)
    assert got.shape == mask.shape and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert (got[mask == 0] == 0).all()


@pytest.mark.parametrize(("name", "params"), CASES[:4], ids=CASE_IDS[:4])
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sum", "global_token"])
def test_reduced_matches_reference(name, params, reduction):
    student, teacher, mask = make_inputs(seed=1)
    per_token = OBJECTIVES[name](student, teacher, mask, temperature=2.0, **params)
    got = reduce_loss(per_token, mask, reduction, num_items=17).item()
    ref = ref_per_token(name, student, teacher, mask, 2.0, **params)
    m = mask.numpy()
    want = {
        "token_mean": (ref * m).sum() / m.sum(),
        "sequence_mean": np.mean([(ref[b] * m[b]).sum() / max(m[b].sum(), 1) for b in range(B)]),
        "sum": (ref * m).sum(),
        "global_token": (ref * m).sum() / 17,
    }[reduction]
    assert got == pytest.approx(want, rel=1e-5)


def test_no_mask_means_every_position():
    student, teacher, _ = make_inputs(seed=2)
    got = forward_kl(student, teacher, None, chunk_size=4)
    want = ref_per_token("forward_kl", student, teacher, None, 1.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_arbitrary_leading_dims():
    student, teacher, mask = make_inputs(seed=3, shape=(2, 3, 4, V))
    got = reverse_kl(student, teacher, mask, chunk_size=5)
    want = ref_per_token("reverse_kl", student, teacher, mask, 1.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_jsd_endpoints_follow_trl_convention():
    """β=0 is forward KL and β=1 reverse KL (special cases), while JSD_β → 0 as β → 0."""
    student, teacher, mask = make_inputs(seed=4)
    fkl, rkl = forward_kl(student, teacher, mask), reverse_kl(student, teacher, mask)
    torch.testing.assert_close(jsd(student, teacher, mask, beta=0.0), fkl)
    torch.testing.assert_close(jsd(student, teacher, mask, beta=1.0), rkl)
    tiny = 1e-4
    near0 = jsd(student.double(), teacher.double(), mask, beta=tiny)
    torch.testing.assert_close(near0 / tiny, fkl.double(), rtol=2e-3, atol=1e-5)


def test_teacher_zero_probability_tokens():
    """A -inf teacher logit (p = 0) adds nothing to p-weighted sums and gives finite grads."""
    student, teacher, mask = make_inputs(seed=5, dtype=torch.float64)
    teacher[..., 3] = float("-inf")
    student.requires_grad_(True)
    for name in ("forward_kl", "jsd", "skew_forward_kl", "tvd", "cross_entropy"):
        out = OBJECTIVES[name](student, teacher, mask, chunk_size=None)
        want = ref_per_token(name, student, teacher, mask, 1.0)
        np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-10, atol=1e-12)
        (grad,) = torch.autograd.grad(out.sum(), student)
        assert torch.isfinite(grad).all(), name
        # The chunked path's closed-form gradients agree (forward KL, cross-entropy).
        s = student.detach().clone().requires_grad_(True)
        OBJECTIVES[name](s, teacher, mask, chunk_size=2).sum().backward()
        torch.testing.assert_close(s.grad, grad, rtol=1e-10, atol=1e-12)
    # Student mass where the teacher has none: the reverse KL is infinite.
    assert torch.isinf(reverse_kl(student, teacher, mask)[mask.bool()]).all()


def test_non_contiguous_view_and_bf16():
    """Aligned views (logits[:, :-1]) and bfloat16 logits go through without a full copy."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(B, T + 1, V, generator=g).bfloat16().requires_grad_(True)
    teacher = torch.randn(B, T + 1, V, generator=g).bfloat16()
    mask = torch.ones(B, T)
    view = logits[:, :-1]
    assert not view.is_contiguous()
    out = forward_kl(view, teacher[:, :-1], mask, chunk_size=4)
    assert out.dtype == torch.float32
    want = ref_per_token("forward_kl", view.float(), teacher[:, :-1].float(), mask, 1.0)
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    assert (logits.grad[:, -1] == 0).all()


# ---------------------------------------------------------------- chunked vs direct
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_chunked_equals_direct_values_and_grads(name, params):
    student, teacher, mask = make_inputs(seed=7, dtype=torch.float64)
    weights = torch.rand(
        mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    grads = []
    for chunk_size in (None, 2):
        s = student.clone().requires_grad_(True)
        out = OBJECTIVES[name](s, teacher, mask, temperature=1.5, chunk_size=chunk_size, **params)
        (out * weights).sum().backward()
        grads.append((out.detach(), s.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-12)


def test_chunked_path_under_no_grad_and_single_backward():
    student, teacher, mask = make_inputs(seed=8)
    direct = forward_kl(student, teacher, mask, chunk_size=None)
    with torch.no_grad():
        torch.testing.assert_close(forward_kl(student, teacher, mask, chunk_size=3), direct)
    s = student.clone().requires_grad_(True)
    loss = forward_kl(s, teacher, mask, chunk_size=3).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()


def test_teacher_requiring_grad_uses_autograd_path():
    student, teacher, mask = make_inputs(seed=9, dtype=torch.float64)
    t = teacher.clone().requires_grad_(True)
    out = forward_kl(student, t, mask, chunk_size=2)
    (grad,) = torch.autograd.grad(out.sum(), t)
    assert grad.abs().sum() > 0


def test_all_masked_out():
    student, teacher, _ = make_inputs(seed=10)
    s = student.clone().requires_grad_(True)
    mask = torch.zeros(B, T)
    out = forward_kl(s, teacher, mask, chunk_size=3)
    assert (out == 0).all()
    reduce_loss(out, mask).backward()
    assert (s.grad == 0).all()


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_gradcheck(name, params):
    g = torch.Generator().manual_seed(11)
    student = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    teacher = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    fn = OBJECTIVES[name]

    def f(s, t):
        return fn(s, t, mask, temperature=1.7, chunk_size=None, **params)

    assert torch.autograd.gradcheck(f, (student, teacher))


def test_invalid_parameters():
    student, teacher, mask = make_inputs()
    with pytest.raises(ValueError, match="beta"):
        jsd(student, teacher, mask, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(student, teacher, mask, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        forward_kl(student, teacher[..., :-1], mask)
    with pytest.raises(ValueError, match="mask shape"):
        forward_kl(student, teacher, mask[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        forward_kl(student, teacher, mask, chunk_size=0)
