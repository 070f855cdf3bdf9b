"""Teacher-mixed sampling (MiniLLM): the decoding loop samples the mixture it claims to, and
the log-probs it returns equal an independent full forward pass of each model."""

from __future__ import annotations

import math

import pytest
import torch

from raykd.batch import token_logprobs
from raykd.losses import log_mixture, teacher_mixed_importance_weights
from raykd.models import build_tiny_model
from raykd.roles.mixture import sample_from_mixture

VOCAB = 16
STOP = 2
PAD = 0


def _pair():
    student = build_tiny_model(VOCAB, seed=1, num_layers=2, hidden_size=32)
    teacher = build_tiny_model(VOCAB, seed=2, num_layers=2, hidden_size=32)
    teacher.model.norm.weight.data.mul_(6.0)  # a peaked teacher, far from the student
    return student, teacher


def _left_pad(prompts):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    return ids, attn


def test_log_mixture_float64_reference_and_endpoints():
    g = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(3, 7, generator=g, dtype=torch.float64), -1)
    log_q = torch.log_softmax(torch.randn(3, 7, generator=g, dtype=torch.float64), -1)
    for a in (0.0, 0.2, 0.5, 1.0):
        ref = torch.log(a * log_p.exp() + (1 - a) * log_q.exp())
        torch.testing.assert_close(log_mixture(log_p, log_q, a), ref, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="mix_alpha"):
        log_mixture(log_p, log_q, 1.5)
    # importance weights of the mixture are q / p~, bounded by 1 / (1 - alpha)
    w = teacher_mixed_importance_weights(log_q, log_p, 0.2)
    torch.testing.assert_close(w, log_q.exp() / (0.2 * log_p.exp() + 0.8 * log_q.exp()))
    assert float(w.max()) <= 1 / 0.8 + 1e-12


def test_returned_logprobs_equal_a_full_forward_of_each_model():
    student, teacher = _pair()
    prompts = [[1, 5, 6, 7, 8], [1, 9], [1, 3, 4]]  # ragged: left padding and positions matter
    ids, attn = _left_pad(prompts)
    torch.manual_seed(0)
    tokens, s_lp, t_lp = sample_from_mixture(
        student, teacher, ids, attn, alpha=0.3, max_new_tokens=10, stop_ids=[STOP], pad_id=PAD
    )
    assert tokens.shape == s_lp.shape == t_lp.shape and tokens.shape[1] <= 10
    for i, p in enumerate(prompts):
        row = tokens[i].tolist()
        n = row.index(STOP) + 1 if STOP in row else len(row)
        assert all(t == PAD for t in row[n:])  # pad after the stop token
        seq = torch.tensor([p + row[:n]])
        for model, got in ((student, s_lp), (teacher, t_lp)):
            with torch.no_grad():
                ref = token_logprobs(model(input_ids=seq).logits, seq)[0, len(p) :]
            torch.testing.assert_close(got[i, :n], ref, rtol=0, atol=1e-4)
            assert torch.all(got[i, n:] == 0)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_first_token_frequencies_follow_the_mixture(alpha):
    student, teacher = _pair()
    n = 20_000
    ids, attn = _left_pad([[1, 5, 6]] * n)
    gen = torch.Generator().manual_seed(123)
    tokens, _, _ = sample_from_mixture(
        student, teacher, ids, attn, alpha=alpha, max_new_tokens=1, stop_ids=[STOP],
        pad_id=PAD, generator=gen,
    )  # fmt: skip
    with torch.no_grad():
        log_q = torch.log_softmax(student(input_ids=ids[:1]).logits[0, -1].double(), -1)
        log_p = torch.log_softmax(teacher(input_ids=ids[:1]).logits[0, -1].double(), -1)
    target = log_mixture(log_p, log_q, alpha).exp()
    empirical = torch.bincount(tokens[:, 0], minlength=VOCAB).double() / n
    tv = 0.5 * float((empirical - target).abs().sum())
    # sampling noise: E[TV] <= 0.5 * sum_v sqrt(p_v / n) (~0.01 here)
    noise = 0.5 * float(target.sqrt().sum()) / math.sqrt(n)
    assert tv < 3 * noise, (tv, noise)
    # and the test can tell the mixture from its parts: they differ by far more than noise
    for other in (log_q.exp(), log_p.exp()):
        gap = 0.5 * float((target - other).abs().sum())
        if gap > 0:
            assert gap > 10 * noise or gap < 1e-12
    assert 0.5 * float((log_p.exp() - log_q.exp()).abs().sum()) > 20 * noise
