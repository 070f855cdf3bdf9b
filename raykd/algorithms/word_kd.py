"""Off-policy word-level knowledge distillation on dataset responses (Hinton et al.).

Per response token ``t`` of a dataset example::

    L = alpha * tau^2 * D(p_T^tau(. | y_<t) || p_S^tau(. | y_<t)) + (1 - alpha) * CE(y_t)

with ``D`` forward KL by default (any divergence in :mod:`raykd.losses`). Teacher targets
are the teacher's top-k log-probs at temperature ``tau`` (plus the tail bucket), scored once
per example by the teacher role and cached on disk: later epochs, resumed runs and sweep
trials read the cache and pay no teacher forward (see ``roles/target_cache.py``).

With ``teacher.prefetch_steps = L > 0`` the cache is filled lazily instead: before each step
the batches of the next ``L`` steps are queued on the teacher scorers, so on a cluster the
teacher scores ahead while the learner trains, and only examples training reaches are scored.

Loop: fill the target cache (or start prefetching) -> build learners -> for step: batch ->
(prefetch ahead, wait for this batch's targets) -> attach cached targets -> train ->
checkpoint -> export (each step's phases timed: ``time/*``).
"""

from __future__ import annotations

import time
from itertools import islice

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
from raykd.losses import hinton_kd_loss
from raykd.roles.target_cache import TargetPrefetcher, TopKCache


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
    cfg, kc = ctx.cfg, ctx.params
    t0 = time.time()
    with StageRoles(ctx) as roles:
        # 1. Teacher targets, once per example (cached across epochs, runs and trials): all of
        #    them before training, or lazily, `lookahead` steps ahead of the learner.
        cache = TopKCache(
            cfg.teacher.cache_dir, ctx.teacher_path, cfg.teacher.top_k, kc.temperature
        )
        lookahead = cfg.teacher.prefetch_steps
        prefetch = None
        stats = {"cached": len(ctx.train), "scored": 0, "seconds": 0.0}
        if lookahead <= 0 and not all(cache.has(ex) for ex in ctx.train):
            with roles.scorers() as scorers:  # freed before the learners start
                stats = cache.fill(ctx.train, scorers, ctx.pad_id, cfg.teacher.batch_size)

        # 2. Learners (resumed from the stage checkpoint if any) and the batches to train.
        learners = roles.learners(ctx.student_in, kc.lr)
        start, _ = resume(ctx, learners)
        stream = example_stream(ctx.train, global_batch_size(cfg), cfg.run.seed, start)
        plan = [examples for _, examples in islice(stream, max(0, kc.steps - start))]
        if lookahead > 0:
            needed = [ex for batch in plan for ex in batch]
            stats["cached"] = len({cache.key(ex) for ex in needed})
            if not all(cache.has(ex) for ex in needed):
                prefetch = TargetPrefetcher(
                    cache, roles.scorers(), ctx.pad_id, cfg.teacher.batch_size
                )
        ctx.rundir.log(ctx.stage, 0, {"teacher_targets_scored": stats["scored"], **stats})

        # 3. Train.
        loss_kwargs = dict(
            alpha=kc.alpha,
            temperature=kc.temperature,
            divergence=kc.divergence,
            divergence_kwargs=dict(kc.divergence_kwargs),
            chunk_size=cfg.learner.loss_chunk_size,
        )
        metrics: dict = {}
        for i, examples in enumerate(plan):
            step = start + i
            timer = StepTimer()
            if prefetch is not None:
                with timer.phase("teacher_wait"):
                    for ahead in plan[i + 1 : i + 1 + lookahead]:
                        prefetch.submit(ahead)  # queued behind this step's batch on the scorers
                    prefetch.wait(examples)
            tensors = dataset_batch(examples, ctx.pad_id)
            tensors["topk_logprobs"], tensors["topk_indices"] = cache.dense(
                examples, tensors["loss_mask"]
            )
            shards = to_micro_batches(tensors, len(learners), cfg.learner.grad_accum)
            with timer.phase("learner", learners):
                metrics = learners.train_step(shards, kd_loss, **loss_kwargs)
            if prefetch is not None:
                metrics["teacher_wait_seconds"] = round(prefetch.wait_seconds, 2)
            metrics.update(timer.metrics())
            ctx.log(step + 1, kc.steps, metrics, t0)
            maybe_checkpoint(ctx, learners, step + 1, kc.steps)

        if prefetch is not None:
            stats = {"cached": stats["cached"] - prefetch.scored, "scored": prefetch.scored,
                     "seconds": round(prefetch.wait_seconds, 1)}  # fmt: skip
        return {**finish(ctx, learners, kc.steps, t0, metrics), "teacher_targets": stats}
