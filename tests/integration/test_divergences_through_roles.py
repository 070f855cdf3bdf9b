"""Every token-level divergence, selected by name, trains through the real roles: a teacher
scorer actor supplies top-k targets, a DeepSpeed learner actor minimises the divergence."""

from __future__ import annotations

import pytest
import torch

from raykd.algorithms.word_kd import kd_loss
from raykd.batch import examples_to_batch
from raykd.data import load_task
from raykd.models import load_tokenizer
from raykd.roles import Learner, RoleGroup, TeacherScorer

from .conftest import FIXTURES

pytestmark = pytest.mark.integration

DIVERGENCES = {
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": 0.5},
    "skew_forward_kl": {"lam": 0.1},
    "skew_reverse_kl": {"lam": 0.1},
    "tvd": {},
}


def test_each_divergence_is_reduced_by_the_learner(ray_node, tiny_teacher, tmp_path):
    from raykd.models import build_tiny_model, save_model

    tok = load_tokenizer(tiny_teacher)
    task = load_task("dolly", tok, path=str(FIXTURES / "dolly_en.jsonl"), max_length=512)
    batch = examples_to_batch(task.train[:2], tok.pad_token_id)
    k, tau = 16, 1.0

    scorer = RoleGroup(TeacherScorer, 1, num_cpus=0.5, make_args=lambda r: ((tiny_teacher,), {}))
    per_example = scorer.call_rank(0, "topk_targets", batch, k, tau)
    scorer.shutdown()
    lp = torch.full((*batch.input_ids.shape, k), -10.0)
    idx = torch.zeros((*batch.input_ids.shape, k), dtype=torch.long)
    for b, (vals, ids) in enumerate(per_example):
        pos = batch.loss_mask[b].nonzero().flatten()
        lp[b, pos], idx[b, pos] = vals, ids.long()
    mb = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "loss_mask": batch.loss_mask,
        "topk_logprobs": lp,
        "topk_indices": idx,
    }
    # a student that differs from the teacher: a fresh random 2-layer model
    student = tmp_path / "student"
    save_model(build_tiny_model(tok, seed=1, num_layers=2, hidden_size=64), tok, student)

    for name, params in DIVERGENCES.items():
        learners = RoleGroup(Learner, 1, num_cpus=0.5, make_args=lambda r: ((0, 1, 1), {}))
        addr, port = learners.call_rank(0, "rendezvous")
        learners.call(
            "setup", addr, port, str(student),
            dict(zero_stage=2, lr=1e-3, weight_decay=0.0, betas=[0.9, 0.95],
                 micro_batch_size=2, grad_accum=1, grad_clip=1.0),
        )  # fmt: skip
        kw = dict(alpha=1.0, temperature=tau, divergence=name, divergence_kwargs=params,
                  chunk_size=64)  # fmt: skip
        losses = [learners.call_rank(0, "train_step", [mb], kd_loss, **kw)["kd"] for _ in range(6)]
        learners.shutdown()
        assert all(torch.isfinite(torch.tensor(losses))), (name, losses)
        # each step lowers the divergence it optimises (values are taken before each update)
        assert all(b < a for a, b in zip(losses, losses[1:])), (name, losses)
        assert losses[-1] < 0.97 * losses[0], (name, losses)
