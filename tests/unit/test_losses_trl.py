"""raykd side by side with TRL 1.16: generalized JSD (GKD) and the GRPO loss.

TRL's own code is called: ``GKDTrainer.generalized_jsd_loss`` is a static method, and
``GRPOTrainer._compute_loss`` is called unbound on a namespace holding exactly the attributes
it reads, with the policy log-probs injected through ``_get_per_token_logps_and_entropies``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from raykd.losses import grpo_loss, hinton_kd_loss, jsd, reduce_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")
GKDTrainer = pytest.importorskip("trl.experimental.gkd.gkd_trainer").GKDTrainer
GRPOTrainer = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer

B, T, V = 3, 6, 13


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _kd_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teacher = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    labels[2, 4:] = -100
    return student, teacher, labels


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_jsd_equals_trl_generalized_jsd(beta, tau):
    student, teacher, labels = _kd_inputs()
    mask = labels != -100
    s_trl = student.clone().requires_grad_(True)
    s_raykd = student.clone().requires_grad_(True)
    # TRL 'batchmean' with labels = sum over unmasked tokens / number of them = token_mean.
    want = GKDTrainer.generalized_jsd_loss(s_trl, teacher, labels, beta=beta, temperature=tau)
    got = reduce_loss(jsd(s_raykd, teacher, mask, beta=beta, temperature=tau, chunk_size=4), mask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    want.backward()
    got.backward()
    torch.testing.assert_close(s_raykd.grad, s_trl.grad, rtol=1e-10, atol=1e-12)

    # num_items_in_batch (gradient-accumulation normaliser) = raykd's global_token reduction.
    want = GKDTrainer.generalized_jsd_loss(
        student, teacher, labels, beta=beta, temperature=tau, num_items_in_batch=37
    )
    per_token = jsd(student, teacher, mask, beta=beta, temperature=tau)
    got = reduce_loss(per_token, mask, "global_token", num_items=37)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_hinton_differs_from_trl_by_temperature_squared():
    """Deliberate difference: raykd's Hinton loss scales the soft term by τ²; TRL does not."""
    student, teacher, labels = _kd_inputs(seed=1)
    mask = labels != -100
    tau = 2.0
    trl = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=0.0, temperature=tau)
    ours, _ = hinton_kd_loss(
        student, labels.clamp(min=0), mask, teacher_logits=teacher, alpha=1.0, temperature=tau
    )
    torch.testing.assert_close(ours, tau**2 * trl, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- GRPO
def _trl_grpo_loss(logps, old, ref, advantages, mask, *, loss_type, beta, eps, eps_high, maxlen, n):
    """TRL's ``GRPOTrainer._compute_loss`` on a stand-in ``self`` (1 process, no accumulation)."""
    fake_self = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps,
        epsilon_high=eps_high,
        use_vllm=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=maxlen,
        _entropy_bonus_enabled=False,
        accelerator=SimpleNamespace(
            num_processes=1,
            reduce=lambda x, reduction: x,
            gather=lambda x: x,
            gather_for_metrics=lambda x: x,
        ),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    bsz, length = mask.shape
    inputs = {
        "prompt_ids": torch.zeros(bsz, 2, dtype=torch.long),
        "prompt_mask": torch.ones(bsz, 2, dtype=torch.long),
        "completion_ids": torch.zeros(bsz, length, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": torch.tensor(float(n)),
    }
    loss = GRPOTrainer._compute_loss(fake_self, None, inputs)
    return loss, {k: v[0] for k, v in fake_self._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trl(loss_type, beta):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 7, generator=g, dtype=torch.float64) * 0.3 - 1.0
    old = base + 0.4 * torch.randn(4, 7, generator=g, dtype=torch.float64)
    ref = base + 0.2 * torch.randn(4, 7, generator=g, dtype=torch.float64)
    advantages = torch.tensor([1.2, -0.7, 0.3, -1.5], dtype=torch.float64)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    kwargs = {"loss_type": loss_type, "beta": beta, "eps": 0.2, "eps_high": 0.28}
    trl_logps = base.clone().requires_grad_(True)
    want, trl_metrics = _trl_grpo_loss(
        trl_logps, old, ref, advantages, mask, **kwargs, maxlen=9, n=31
    )
    logps = base.clone().requires_grad_(True)
    got, metrics = grpo_loss(
        logps,
        old,
        advantages,
        mask,
        epsilon=0.2,
        epsilon_high=0.28,
        beta=beta,
        ref_logprobs=ref,
        loss_type=loss_type,
        max_completion_length=9,
        num_items_in_batch=31,
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    want.backward()
    got.backward()
    torch.testing.assert_close(logps.grad, trl_logps.grad, rtol=1e-12, atol=1e-12)
    assert trl_metrics["clip_ratio/low_mean"] > 0 and trl_metrics["clip_ratio/high_mean"] > 0
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert metrics[key] == pytest.approx(trl_metrics[key], rel=1e-6)
    if beta:
        assert metrics["kl"] == pytest.approx(trl_metrics["kl"], rel=1e-10)
