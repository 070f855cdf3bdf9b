"""Non-finite losses and gradients on real DeepSpeed learner ranks: the step is skipped on every
rank (weights bit-identical, optimizer and learning-rate schedule untouched), counted, and
``learner.max_bad_steps`` of them in a row stop training with the last good checkpoint named."""

from __future__ import annotations

import sys

import pytest
import ray
import torch

from raykd.batch import token_logprobs
from raykd.roles import Learner, RoleGroup
from raykd.roles.step_guard import NonFiniteTrainingError

pytestmark = pytest.mark.integration
# The loss below travels by value (workers cannot import this test module).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

SETUP = dict(
    lr=5e-3,
    weight_decay=0.1,
    betas=[0.9, 0.95],
    warmup_steps=4,  # the learning rate depends on how many steps the schedule has taken
    micro_batch_size=2,
    grad_accum=1,
    grad_clip=100.0,
    seed=0,
)


def coefficient_loss(model, mb):
    """Cross-entropy times the micro-batch's ``coef`` (inf: a non-finite loss), plus, when
    ``nan_grad`` is set, ``sqrt(|s - s|)`` of the logit sum ``s``: a term whose value is 0 (the
    loss stays finite) and whose gradient is inf * sign(0) = NaN."""
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    mask = mb["loss_mask"]
    ce = -(token_logprobs(logits, mb["input_ids"]) * mask).sum() / mask.sum()
    loss = ce * mb["coef"][0]
    if bool(mb["nan_grad"][0]):
        s = logits.sum()
        loss = loss + torch.sqrt((s - s.detach()).abs())
    return loss, {"ce": ce.item()}


def _group(world: int, model_path: str, zero_stage: int, **extra) -> RoleGroup:
    group = RoleGroup(
        Learner, world, num_cpus=0.5, make_args=lambda r: ((r, world, 1), {}), name="learner"
    )
    addr, port = group.call_rank(0, "rendezvous")
    group.call("setup", addr, port, model_path, {**SETUP, "zero_stage": zero_stage, **extra})
    return group


def _rows(seed: int, coef: float = 1.0, nan_grad: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (2, 12), generator=g)
    mask = torch.ones(2, 12)
    mask[:, :4] = 0
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask,
            "coef": torch.tensor([coef]), "nan_grad": torch.tensor([float(nan_grad)])}  # fmt: skip


def _step(group: RoleGroup, per_rank: list[dict]) -> list[dict]:
    return group.call_per_rank("train_step", [([mb], coefficient_loss) for mb in per_rank])


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_a_bad_step_on_one_rank_is_skipped_on_all(ray_node, tiny_teacher, zero_stage):
    group = _group(2, tiny_teacher, zero_stage)
    first = _step(group, [_rows(1), _rows(2)])
    assert [m["skipped"] for m in first] == [0.0, 0.0]
    before = group.call("state_dict")[0]

    # rank 1 alone has an infinite loss coefficient: both ranks skip
    bad_loss = _step(group, [_rows(3), _rows(4, coef=float("inf"))])
    assert [m["skipped"] for m in bad_loss] == [1.0, 1.0]
    assert bad_loss[1]["loss"] == float("inf")
    assert _equal(group.call("state_dict")[0], before)
    # a finite loss whose gradient is NaN (on rank 0 only): skipped too
    bad_grad = _step(group, [_rows(5, nan_grad=True), _rows(6)])
    assert [m["skipped"] for m in bad_grad] == [1.0, 1.0]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in bad_grad)
    assert _equal(group.call("state_dict")[0], before)
    digests = group.call("weight_digest")
    assert digests[0] == digests[1]

    last = _step(group, [_rows(7), _rows(8)])
    after = group.call("state_dict")[0]
    group.shutdown()

    # the same run without the two bad steps: the same weights, bit for bit, and the same
    # learning rate (Adam's moments and step count and the warmup schedule did not move; the
    # reported lr is the next step's: warmup 3/4 after two applied steps)
    ref = _group(2, tiny_teacher, zero_stage)
    _step(ref, [_rows(1), _rows(2)])
    ref_last = _step(ref, [_rows(7), _rows(8)])
    ref_after = ref.call("state_dict")[0]
    ref.shutdown()
    assert [m["skipped"] for m in last] == [0.0, 0.0]
    assert last[0]["lr"] == ref_last[0]["lr"] == pytest.approx(SETUP["lr"] * 3 / 4)
    assert _equal(after, ref_after)
    assert not _equal(after, before)


def test_max_bad_steps_in_a_row_stop_with_the_last_checkpoint(ray_node, tiny_teacher, tmp_path):
    group = _group(1, tiny_teacher, zero_stage=0, max_bad_steps=2)
    inf = float("inf")
    try:
        assert _step(group, [_rows(1)])[0]["skipped"] == 0.0
        ckpt = tmp_path / "checkpoints" / "sft"
        group.call("save_checkpoint", str(ckpt), {"step": 1})
        assert _step(group, [_rows(2, coef=inf)])[0]["skipped"] == 1.0  # 1 in a row
        assert _step(group, [_rows(3)])[0]["skipped"] == 0.0  # a good step resets the count
        assert _step(group, [_rows(4, coef=inf)])[0]["skipped"] == 1.0  # 1 in a row
        kept = group.call("state_dict")[0]
        with pytest.raises(NonFiniteTrainingError) as info:
            _step(group, [_rows(5, nan_grad=True)])  # 2 in a row: stop
        message = str(info.value.cause)  # the learner's exception inside Ray's RayTaskError
        prefix = (
            "learner: 2 consecutive steps (4-5) had a non-finite loss or gradient "
            "(last: rank 0: loss "
        )
        suffix = (
            "; learner.max_bad_steps=2); stopping. None of them changed the weights; the last "
            f"good checkpoint is kept: {ckpt} (step 1); rerunning the same command resumes from "
            "it. Lower learner.lr or check the data and loss settings first."
        )
        assert message.startswith(prefix) and message.endswith(suffix), message
        last_loss = float(message[len(prefix) :].split(",")[0])
        assert torch.isfinite(torch.tensor(last_loss))  # step 5: a finite loss, a NaN gradient
        assert _equal(group.call("state_dict")[0], kept)  # the stopping step changed nothing
        assert group.call("load_checkpoint", str(ckpt))[0]["step"] == 1  # still loadable
    finally:
        group.shutdown()
