"""DeepSpeed learner ranks as Ray actors: data parallelism keeps ranks identical and equals
one rank on the whole batch."""

from __future__ import annotations

import pytest
import torch

from raykd.algorithms.supervised import sft_loss
from raykd.roles import Learner, RoleGroup

pytestmark = pytest.mark.integration

SETUP = dict(
    lr=5e-3,
    weight_decay=0.0,
    betas=[0.9, 0.95],
    micro_batch_size=2,
    grad_clip=100.0,
    seed=0,
)


def _group(world: int, model_path: str, zero_stage: int, grad_accum: int) -> RoleGroup:
    group = RoleGroup(
        Learner, world, num_cpus=0.5, make_args=lambda r: ((r, world, 1), {}), name="learner"
    )
    addr, port = group.call_rank(0, "rendezvous")
    group.call(
        "setup",
        addr,
        port,
        model_path,
        {**SETUP, "zero_stage": zero_stage, "grad_accum": grad_accum},
    )
    return group


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (4, 12), generator=g)
    mask = torch.ones(4, 12)
    mask[:, :4] = 0  # a "prompt" of 4 tokens; every row has the same number of targets
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask}


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_match_each_other_and_one_rank(ray_node, tiny_teacher, zero_stage):
    b = _batch()
    rows = lambda r: {k: v[r] for k, v in b.items()}  # noqa: E731

    two = _group(2, tiny_teacher, zero_stage=zero_stage, grad_accum=1)
    for _ in range(3):
        two.call_per_rank("train_step", [([rows([0, 1])], sft_loss), ([rows([2, 3])], sft_loss)])
    digests = two.call("weight_digest")
    state_two = two.call("state_dict")
    two.shutdown()
    assert state_two[1] is None  # full weights are gathered on rank 0 only
    assert digests[0] == digests[1]  # bitwise-identical replicas

    # one rank, the same 4 rows as 2 accumulated micro-batches of 2: the same update
    one = _group(1, tiny_teacher, zero_stage=0, grad_accum=2)
    for _ in range(3):
        one.call_per_rank("train_step", [([rows([0, 1]), rows([2, 3])], sft_loss)])
    state_one = one.call("state_dict")[0]
    one.shutdown()
    # Adam moves each weight by ~lr per step (5e-3 here); a missed or wrong all-reduce shows
    # up at that scale, float reduction order at ~1e-5.
    for name, w in state_one.items():
        torch.testing.assert_close(state_two[0][name], w, rtol=1e-3, atol=1e-4, msg=name)
    # and training moved the weights
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(tiny_teacher).state_dict()
    assert any(not torch.allclose(init[k], state_one[k]) for k in state_one)
