"""On-policy distillation by reverse KL: MiniLLM policy gradient (Gu et al., ICLR 2024).

Minimise ``KL(q_S || p_T)`` over sampled responses. With ``y`` drawn from the sampler
(the student ``q_old``, or with teacher-mixed sampling ``p~ = a p_T + (1 - a) q_old``), per
response token::

    r_t  = log p_T(y_t | y_<t) - log q_old(y_t | y_<t)          (reward)
    R_t  = sum_{s>=t} gamma^{s-t} r_s   [/ (T - t) with length normalisation]
    A_t  = R_t, or R_{t+1} when the single-step term covers step t     [optionally whitened]
    w_t  = q_old(y_t) / p~(y_t)   (1 without mixing; clipped at max_importance_weight)
    rho  = q_theta(y_t) / q_old(y_t)
    L_PG = mean_t w_t * -min(rho * A_t, clip(rho, 1-eps, 1+eps) * A_t)      (A_t, w_t detached)
    L_SS = mean_t w_t * KL(q_theta(.|y_<t) || p_T(.|y_<t))   (full vocabulary, exact gradient)
    L    = L_PG + single_step_coef * L_SS + lm_coef * CE(dataset responses)   (MiniLLM's L_PT)

Where each piece is computed: the rollout workers sample (and, when mixing, run the teacher
alongside, returning ``log p_T(y_t)`` too); otherwise teacher scorers give ``log p_T(y_t)``;
the learners recompute ``log q_old`` while the teacher scores (after it where the two would
share cores: :func:`scoring_side_by_side`), so the ratio is 1 on the first PPO epoch, and, for
``L_SS``, hold a colocated teacher so full-vocabulary logits never leave the
actor. The samplers hold the learners' weights, so the ``hf`` sampler's own ``log q(y_t)``
(same model code: ``SamplerCapabilities.exact_logprobs``) is ``log q_old`` up to rounding: once a
recomputation finds them within :data:`EXACT_LOGPROBS` of the learners' (``sampler_mismatch``),
the stage uses them and skips the recomputation (``old_logprobs_recomputed`` is 0); other
engines (vLLM) and samplers that do not match (lower precision) are recomputed every step.
Rewards, returns, advantages and weights are small ``[B, T]`` tensors built here on the
controller.

Loop per step: sample -> score -> advantages -> ``ppo_epochs`` updates -> sync weights; each
phase's time is logged with the step (``time/*``, see :class:`~raykd.algorithms.common.StepTimer`).
"""

from __future__ import annotations

import os
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
    learner_logprobs,
    maybe_checkpoint,
    resume,
    sample_rollouts,
    start_scored_logprobs,
    to_micro_batches,
)
from raykd.batch import token_logprobs
from raykd.losses import (
    clipped_policy_loss,
    discounted_returns,
    masked_mean,
    minillm_advantages,
    minillm_rewards,
    single_step_reverse_kl,
    teacher_mixed_importance_weights,
)
from raykd.roles.backends import sampler_class
from raykd.roles.factory import actor_threads

#: Mean |log q_sampler(y_t) - log q_learner(y_t)| per response token within which the samplers'
#: own log-probs stand for the learners' ``log q_old`` (float32 rounding of cached decoding vs a
#: full forward is ~1e-6; a policy-gradient ratio off by 1e-4 is far inside the clip range).
EXACT_LOGPROBS = 1e-4


def scoring_side_by_side(cfg) -> bool:
    """Whether teacher scoring and the learners' ``log q_old`` recomputation run at the same
    time: yes on a cluster, and on an embedded node whose CPUs cover both roles' torch threads;
    otherwise one after the other, as two thread pools on the same cores each slow down more
    than they gain (2 cores, 2 + 2 threads: 4.5 s each side by side vs ~1.4 s alone)."""
    if cfg.ray.address:
        return True
    tc, lc = cfg.teacher, cfg.learner
    threads = (tc.num_workers * actor_threads(tc.cpus_per_worker, tc.num_threads)
               + lc.num_ranks * actor_threads(lc.cpus_per_rank, lc.num_threads))  # fmt: skip
    return threads <= (cfg.ray.num_cpus or os.cpu_count() or 1)


def reverse_kl_pg_loss(
    model, mb, *, clip_eps, lm_coef, single_step_coef=0.0, chunk_size=None, teachers=None
):
    """Learner-side loss of one micro-batch: ``L_PG (+ c_ss L_SS) (+ c_lm CE)``.

    ``mb["weights"]`` (optional) are the per-token importance weights ``w_t``; ``teachers``
    are the actor's colocated teachers (the first one serves ``L_SS``)."""
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    lp = token_logprobs(logits, mb["input_ids"])
    mask = mb["loss_mask"][:, 1:]
    weights = mb["weights"][:, 1:] if "weights" in mb else None
    pg, metrics = clipped_policy_loss(
        lp[:, 1:],
        mb["old_logprobs"][:, 1:],
        mb["advantages"][:, 1:],
        mask,
        clip_eps=clip_eps,
        importance_weights=weights,
    )
    loss = pg
    metrics = {"pg": pg.item(), **metrics}
    if single_step_coef > 0:
        with torch.no_grad():
            teacher_logits = teachers[0](
                input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]
            ).logits
        single = single_step_reverse_kl(
            logits[:, :-1], teacher_logits[:, :-1], mask, weights=weights, chunk_size=chunk_size
        )
        loss = loss + single_step_coef * single
        metrics["single_step"] = single.item()
    if lm_coef > 0 and "lm_input_ids" in mb:
        lm_logits = model(
            input_ids=mb["lm_input_ids"], attention_mask=mb["lm_attention_mask"]
        ).logits
        lm_lp = token_logprobs(lm_logits, mb["lm_input_ids"])
        lm = masked_mean(-lm_lp, mb["lm_loss_mask"])
        loss = loss + lm_coef * lm
        metrics["lm"] = lm.item()
    return loss, metrics


def run(ctx: StageContext) -> dict:
    cfg, oc = ctx.cfg, ctx.params
    t0 = time.time()
    mixing, single_step = oc.mix_alpha > 0, oc.single_step_coef > 0
    with StageRoles(ctx) as roles:
        # 0. Roles: learners (+ the teacher colocated for L_SS), samplers (+ the teacher for
        #    mixed sampling), teacher scorers unless the mixing samplers score y themselves.
        extra = {"teachers": [ctx.teacher_path]} if single_step else None
        learners = roles.learners(ctx.student_in, oc.lr, extra=extra)
        start, _ = resume(ctx, learners)
        samplers = roles.samplers(ctx.student_in, ctx.teacher_path if mixing else None)
        if start:
            learners.sync_weights(samplers)
        scorers = None if mixing else roles.scorers()
        grad_accum, world = cfg.learner.grad_accum, len(learners)
        lm_stream = example_stream(ctx.train, oc.prompts_per_step, cfg.run.seed + 1, start)
        loss_kwargs = dict(
            clip_eps=oc.clip_eps,
            lm_coef=oc.lm_coef,
            single_step_coef=oc.single_step_coef,
            chunk_size=cfg.learner.loss_chunk_size,
        )

        metrics: dict = {}
        side_by_side = scoring_side_by_side(cfg)
        # learners recompute log q_old until the samplers' own match theirs (if they can)
        recompute, trust = True, sampler_class(cfg.rollout.backend).capabilities.exact_logprobs
        for step, examples in example_stream(ctx.train, oc.prompts_per_step, cfg.run.seed, start):
            if step >= oc.steps:
                break
            timer = StepTimer()
            # 1. Sample from the current student (or from its mixture with the teacher).
            seed = cfg.run.seed * 1000 + step
            with timer.phase("sampling", samplers):
                rollout = sample_rollouts(
                    ctx, samplers, examples, seed=seed, mix_alpha=oc.mix_alpha
                )
            batch, mask = rollout.batch, rollout.batch.loss_mask
            # 2. Score, side by side: teacher log-probs (scorers; the mixing samplers gave them
            #    already) and old policy log-probs (learners, or the samplers' own once exact).
            mismatch = None
            with timer.phase("scoring", teacher_scoring=scorers, old_logprobs=learners):
                teacher_lp = rollout.teacher_logprobs if mixing else None
                pending = None if mixing else start_scored_logprobs(scorers, batch)
                old_lp = rollout.logprobs * mask
                if recompute and pending is not None and not side_by_side:
                    teacher_lp, pending = pending(), None  # first: they would share the cores
                if recompute:
                    learner_lp = learner_logprobs(learners, batch)
                    n_tok = mask.sum().clamp_min(1.0)
                    mismatch = float(((old_lp - learner_lp).abs() * mask).sum() / n_tok)
                    old_lp, recompute = learner_lp, not trust or mismatch > EXACT_LOGPROBS
                if pending is not None:
                    teacher_lp = pending()
            # 3. Rewards, returns, advantages, importance weights (controller side: [B, T]).
            rewards = minillm_rewards(teacher_lp, old_lp, mask)
            returns = discounted_returns(
                rewards, mask, gamma=oc.gamma, length_normalize=oc.length_normalize
            )
            adv = minillm_advantages(
                returns, mask, future_only=single_step, whiten_advantages=oc.whiten
            )
            tensors = {**batch_tensors(batch), "old_logprobs": old_lp, "advantages": adv}
            if mixing:
                weights = teacher_mixed_importance_weights(
                    old_lp, teacher_lp, oc.mix_alpha, max_weight=oc.max_importance_weight
                )
                tensors["weights"] = weights * mask
            # 4. Clipped policy-gradient updates (+ single-step term, + LM term on the data).
            _, lm_examples = next(lm_stream)
            lm = dataset_batch(lm_examples, ctx.pad_id)
            tensors.update({f"lm_{k}": v for k, v in lm.items()})
            with timer.phase("learner", learners):
                for _ in range(oc.ppo_epochs):
                    shards = to_micro_batches(tensors, world, grad_accum)
                    metrics = learners.train_step(shards, reverse_kl_pg_loss, **loss_kwargs)
            # 5. Push the new weights to the samplers.
            with timer.phase("weight_sync", learners, samplers):
                metrics.update(learners.sync_weights(samplers))
            n_tok = mask.sum().clamp_min(1.0)
            metrics.update(
                reward=float((rewards * mask).sum() / n_tok),
                # sum_t (log q - log p_T) per sequence: the reverse KL estimate
                reverse_kl=float(-(rewards * mask).sum() / mask.shape[0]),
                response_tokens=float(n_tok / mask.shape[0]),
                old_logprobs_recomputed=float(mismatch is not None),
            )
            if mismatch is not None:
                metrics["sampler_mismatch"] = mismatch
            if mixing:
                metrics["importance_weight"] = float(masked_mean(tensors["weights"], mask))
            metrics.update(timer.metrics())
            ctx.log(step + 1, oc.steps, metrics, t0)
            maybe_checkpoint(ctx, learners, step + 1, oc.steps)

        return finish(ctx, learners, oc.steps, t0, metrics)
