"""Off-policy word-level knowledge distillation on dataset responses (Hinton et al.).

Per response token ``t`` of a dataset example::

    L = alpha * tau^2 * D(p_T^tau(. | y_<t) || p_S^tau(. | y_<t)) + (1 - alpha) * CE(y_t)

with ``D`` forward KL by default (any divergence in :mod:`raykd.losses`). Teacher targets
are the teacher's top-k log-probs at temperature ``tau`` (plus the tail bucket), scored once
per example by the teacher role and cached on disk: later epochs, resumed runs and sweep
trials read the cache and pay no teacher forward (see ``roles/target_cache.py``).

Loop: fill the target cache -> build learners -> for step: batch -> attach cached targets ->
train -> checkpoint -> export.
"""

from __future__ import annotations

import time

from raykd.algorithms.common import (
    StageContext,
    dataset_batch,
    example_stream,
    finish,
    global_batch_size,
    make_learners,
    make_scorers,
    maybe_checkpoint,
    mean_metrics,
    resume,
    to_micro_batches,
)
from raykd.losses import hinton_kd_loss
from raykd.roles.target_cache import TopKCache


def kd_loss(model, mb, *, alpha, temperature, divergence, divergence_kwargs, chunk_size):
    """Learner-side loss of one micro-batch (runs inside the DeepSpeed engine's actor)."""
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    # logits[:, t] predicts token t+1: pair the view logits[:, :-1] with [:, 1:] targets.
    return hinton_kd_loss(
        logits[:, :-1],
        mb["input_ids"][:, 1:],
        mb["loss_mask"][:, 1:],
        teacher_topk=(mb["topk_logprobs"][:, 1:], mb["topk_indices"][:, 1:]),
        alpha=alpha,
        temperature=temperature,
        divergence=divergence,
        divergence_kwargs=dict(divergence_kwargs),
        chunk_size=chunk_size,
    )


def run(ctx: StageContext) -> dict:
    cfg, kc = ctx.cfg, ctx.cfg.word_kd
    t0 = time.time()

    # 1. Teacher targets, once per example (cached across epochs, runs and trials).
    cache = TopKCache(cfg.teacher.cache_dir, ctx.teacher_path, cfg.teacher.top_k, kc.temperature)
    if any(cache.get(ex) is None for ex in ctx.train):
        scorers = make_scorers(ctx)
        stats = cache.fill(ctx.train, scorers, ctx.pad_id, cfg.teacher.batch_size)
        scorers.shutdown()
    else:
        stats = {"cached": len(ctx.train), "scored": 0, "seconds": 0.0}
    ctx.rundir.log(ctx.stage, 0, {"teacher_targets_scored": stats["scored"], **stats})

    # 2. Learners, resumed from the stage checkpoint if there is one.
    learners = make_learners(ctx, ctx.student_in, kc.lr)
    start = resume(ctx, learners)
    loss_kwargs = dict(
        alpha=kc.alpha,
        temperature=kc.temperature,
        divergence=kc.divergence,
        divergence_kwargs=dict(kc.divergence_kwargs),
        chunk_size=cfg.learner.loss_chunk_size,
    )

    # 3. Train.
    metrics: dict = {}
    stream = example_stream(ctx.train, global_batch_size(cfg), cfg.run.seed, start)
    for step, examples in stream:
        if step >= kc.steps:
            break
        tensors = dataset_batch(examples, ctx.pad_id)
        tensors["topk_logprobs"], tensors["topk_indices"] = cache.dense(
            examples, tensors["loss_mask"]
        )
        shards = to_micro_batches(tensors, len(learners), cfg.learner.grad_accum)
        metrics = mean_metrics(
            learners.call_per_rank("train_step", [(s, kd_loss) for s in shards], **loss_kwargs)
        )
        ctx.log(step + 1, kc.steps, metrics, t0)
        maybe_checkpoint(ctx, learners, step + 1, kc.steps)

    return {**finish(ctx, learners, kc.steps, t0, metrics), "teacher_targets": stats}
