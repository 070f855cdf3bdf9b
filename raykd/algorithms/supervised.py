"""Supervised fine-tuning on dataset responses (teacher SFT, or the student-only baseline).

Per response token: ``L = -log q(y_t | y_<t)``, averaged over the response tokens of the
micro-batch.
"""

from __future__ import annotations

import time

from raykd.algorithms.common import (
    StageContext,
    StageRoles,
    StepTimer,
    dataset_batch,
    example_stream,
    finish,
    global_batch_size,
    maybe_checkpoint,
    resume,
    to_micro_batches,
)
from raykd.batch import Example, token_logprobs


def sft_loss(model, mb):
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    lp = token_logprobs(logits, mb["input_ids"])
    mask = mb["loss_mask"]
    ce = -(lp * mask).sum() / mask.sum().clamp_min(1.0)
    return ce, {"ce": ce.item()}


def train_cross_entropy(
    ctx: StageContext, examples: list[Example], steps: int, lr: float | None, t0: float
) -> dict:
    """Fine-tune the stage's student on ``examples`` by cross-entropy for ``steps`` steps."""
    cfg = ctx.cfg
    with StageRoles(ctx) as roles:
        learners = roles.learners(ctx.student_in, lr)
        start, _ = resume(ctx, learners)
        metrics: dict = {}
        stream = example_stream(examples, global_batch_size(cfg), cfg.run.seed, start)
        for step, batch in stream:
            if step >= steps:
                break
            timer = StepTimer()
            shards = to_micro_batches(
                dataset_batch(batch, ctx.pad_id), len(learners), cfg.learner.grad_accum
            )
            with timer.phase("learner", learners):
                metrics = learners.train_step(shards, sft_loss)
            metrics.update(timer.metrics())
            ctx.log(step + 1, steps, metrics, t0)
            maybe_checkpoint(ctx, learners, step + 1, steps)
        return finish(ctx, learners, steps, t0, metrics)


def run(ctx: StageContext) -> dict:
    return train_cross_entropy(ctx, ctx.train, ctx.params.steps, ctx.params.lr, time.time())
