"""Generalized knowledge distillation, GKD (Agarwal et al. 2024).

Each step trains on one batch of responses ``y`` to the step's prompts ``x``. With probability
``lambda`` (``gkd.lmbda``) the batch is *on-policy*: ``y ~ q_S(. | x)``, sampled by the rollout
workers from the current student; otherwise it is the dataset's responses or, with
``gkd.off_policy=teacher``, fresh samples ``y ~ p_T(. | x)`` from teacher-held rollout workers
(the paper's teacher-generated outputs). Per response token,
with ``p = p_T^tau(. | x, y_<t)`` the teacher and ``q = q_S^tau(. | x, y_<t)`` the student::

    m    = beta * p + (1 - beta) * q
    JSD  = beta * KL(p || m) + (1 - beta) * KL(q || m)
    L    = mean over response tokens of JSD          (token mean)

``beta = 0`` is taken as the forward ``KL(p || q)`` and ``beta = 1`` as the reverse
``KL(q || p)`` (TRL's convention). The teacher ships its top-k log-probs at temperature
``tau`` plus a tail bucket, and the student is bucketed the same way
(``raykd.losses.topk_jsd``). Targets on dataset responses are scored once per example and
cached, as in ``word_kd``; targets on sampled responses are scored afresh every step. The
on/off-policy draw is seeded by ``(run.seed, step)``, so a resumed run makes the same draws
as an unbroken one.

Loop: build learners, rollout workers (when ``lambda > 0``) and teacher scorers -> for step:
draw on/off-policy -> responses -> teacher top-k targets -> train -> sync weights ->
checkpoint -> export (each step's phases timed: ``time/*``).
"""

from __future__ import annotations

import random
import time

import torch

from raykd.algorithms.common import (
    StageContext,
    StageRoles,
    StepTimer,
    batch_tensors,
    dataset_batch,
    example_stream,
    finish,
    global_batch_size,
    maybe_checkpoint,
    resume,
    sample_rollouts,
    split_batch,
    to_micro_batches,
)
from raykd.batch import SequenceBatch, scatter_topk
from raykd.losses import reduce_loss, topk_jsd
from raykd.roles.target_cache import TopKCache


def gkd_loss(model, mb, *, beta, temperature, chunk_size):
    """Learner-side loss of one micro-batch: token-mean generalized JSD to the teacher."""
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    mask = mb["loss_mask"][:, 1:]
    # logits[:, t] predicts token t+1: pair the view logits[:, :-1] with [:, 1:] targets.
    per_token = topk_jsd(
        logits[:, :-1],
        mb["topk_logprobs"][:, 1:],
        mb["topk_indices"][:, 1:],
        mask,
        beta=beta,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    loss = reduce_loss(per_token, mask, "token_mean")
    return loss, {"jsd": loss.item()}


def is_on_policy(seed: int, step: int, lmbda: float) -> bool:
    """The step's on/off-policy draw, a pure function of ``(seed, step)``."""
    return random.Random(seed * 1_000_003 + step).random() < lmbda


def fresh_targets(
    scorers, batch: SequenceBatch, k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher top-k targets of ``batch``'s response positions, dense ``[B, T, k]`` (not cached).

    Positions off the loss mask hold a valid filler distribution that no loss reads."""
    parts = split_batch(batch, len(scorers))
    per_example = [t for part in scorers.map("topk_targets", parts, k=k, temperature=temperature)
                   for t in part]  # fmt: skip
    return scatter_topk(per_example, batch.loss_mask, k, batch.uids)


OFF_POLICY = ("dataset", "teacher")


def run(ctx: StageContext) -> dict:
    cfg, gc = ctx.cfg, ctx.params
    teacher_samples = gc.off_policy == "teacher" and gc.lmbda < 1
    t0 = time.time()
    k = cfg.teacher.top_k

    with StageRoles(ctx) as roles:
        # 1. Roles: learners (resumed if a checkpoint exists), samplers, teacher scorers.
        learners = roles.learners(ctx.student_in, gc.lr)
        start, _ = resume(ctx, learners)
        samplers = roles.samplers(ctx.student_in) if gc.lmbda > 0 else None
        if samplers is not None and start:
            learners.sync_weights(samplers)
        teacher_samplers = (
            roles.samplers(ctx.teacher_path, slot="teacher_rollout") if teacher_samples else None
        )
        scorers = roles.scorers()
        cache = TopKCache(cfg.teacher.cache_dir, ctx.teacher_path, k, gc.temperature)
        loss_kwargs = dict(
            beta=gc.beta, temperature=gc.temperature, chunk_size=cfg.learner.loss_chunk_size
        )

        # 2. Train.
        metrics: dict = {}
        stream = example_stream(ctx.train, global_batch_size(cfg), cfg.run.seed, start)
        for step, examples in stream:
            if step >= gc.steps:
                break
            timer = StepTimer()
            on_policy = is_on_policy(cfg.run.seed, step, gc.lmbda)
            # Responses and teacher targets: the student's or the teacher's samples (scored
            # now) or the dataset's responses (scored once, then cached).
            if on_policy or teacher_samples:
                sampler = samplers if on_policy else teacher_samplers
                seed = cfg.run.seed * 1000 + step
                with timer.phase("sampling", sampler):
                    batch = sample_rollouts(ctx, sampler, examples, seed=seed).batch
                tensors = batch_tensors(batch)
                with timer.phase("teacher_scoring", scorers):
                    targets = fresh_targets(scorers, batch, k, gc.temperature)
            else:
                with timer.phase("teacher_scoring", scorers):
                    cache.fill(examples, scorers, ctx.pad_id, cfg.teacher.batch_size)
                tensors = dataset_batch(examples, ctx.pad_id)
                targets = cache.dense(examples, tensors["loss_mask"])
            tensors["topk_logprobs"], tensors["topk_indices"] = targets
            shards = to_micro_batches(tensors, len(learners), cfg.learner.grad_accum)
            with timer.phase("learner", learners):
                metrics = learners.train_step(shards, gkd_loss, **loss_kwargs)
            # The samplers follow the student.
            if samplers is not None:
                with timer.phase("weight_sync", learners, samplers):
                    metrics.update(learners.sync_weights(samplers))
            mask = tensors["loss_mask"]
            metrics.update(
                on_policy=float(on_policy), response_tokens=float(mask.sum() / mask.shape[0])
            )
            metrics.update(timer.metrics())
            ctx.log(step + 1, gc.steps, metrics, t0)
            maybe_checkpoint(ctx, learners, step + 1, gc.steps)

        return finish(ctx, learners, gc.steps, t0, metrics)
