"""On-policy distillation by reverse KL: MiniLLM-style policy gradient.

Minimise ``KL(q_S || p_T)`` over the student's own samples. With ``y ~ q_old`` (the student
at sampling time), per response token::

    r_t  = log p_T(y_t | y_<t) - log q_old(y_t | y_<t)          (reward, from the teacher role)
    R_t  = sum_{s>=t} gamma^{s-t} r_s   [/ (T - t) with length normalisation]
    rho  = q_theta(y_t) / q_old(y_t)
    L_PG = -mean_t min(rho * R_t, clip(rho, 1-eps, 1+eps) * R_t)    (R_t detached)
    L    = L_PG + lm_coef * CE(dataset responses)                   (MiniLLM's L_PT term)

Loop per step: rollout workers sample -> learners recompute ``log q_old`` (so the ratio is
exactly 1 on the first PPO epoch) -> teacher scorers give ``log p_T`` -> returns ->
``ppo_epochs`` clipped updates -> weights synced back to the rollout workers.
"""

from __future__ import annotations

import time

import torch

from raykd.algorithms.common import (
    StageContext,
    batch_tensors,
    dataset_batch,
    example_stream,
    finish,
    learner_logprobs,
    make_learners,
    make_rollouts,
    make_scorers,
    maybe_checkpoint,
    mean_metrics,
    resume,
    sample_rollouts,
    split_batch,
    sync_weights,
    to_micro_batches,
)
from raykd.batch import token_logprobs
from raykd.losses import clipped_policy_loss, discounted_returns, minillm_rewards, whiten


def reverse_kl_pg_loss(model, mb, *, clip_eps, lm_coef):
    """Learner-side loss of one micro-batch: clipped policy gradient (+ optional LM term)."""
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    lp = token_logprobs(logits, mb["input_ids"])
    pg, metrics = clipped_policy_loss(
        lp[:, 1:],
        mb["old_logprobs"][:, 1:],
        mb["advantages"][:, 1:],
        mb["loss_mask"][:, 1:],
        clip_eps=clip_eps,
    )
    loss = pg
    metrics = {"pg": pg.item(), **metrics}
    if lm_coef > 0 and "lm_input_ids" in mb:
        lm_logits = model(
            input_ids=mb["lm_input_ids"], attention_mask=mb["lm_attention_mask"]
        ).logits
        lm_lp = token_logprobs(lm_logits, mb["lm_input_ids"])
        lm_mask = mb["lm_loss_mask"]
        lm = -(lm_lp * lm_mask).sum() / lm_mask.sum().clamp_min(1.0)
        loss = loss + lm_coef * lm
        metrics["lm"] = lm.item()
    return loss, metrics


def run(ctx: StageContext) -> dict:
    cfg, oc = ctx.cfg, ctx.cfg.reverse_kl
    t0 = time.time()
    learners = make_learners(ctx, ctx.student_in, oc.lr)
    start = resume(ctx, learners)
    rollouts = make_rollouts(cfg, ctx.student_in)
    if start:
        sync_weights(learners, rollouts)
    scorers = make_scorers(ctx)
    grad_accum, world = cfg.learner.grad_accum, len(learners)
    lm_stream = example_stream(ctx.train, oc.prompts_per_step, cfg.run.seed + 1, start)

    metrics: dict = {}
    for step, examples in example_stream(ctx.train, oc.prompts_per_step, cfg.run.seed, start):
        if step >= oc.steps:
            break
        # 1. Sample from the current student.
        rollout = sample_rollouts(ctx, rollouts, examples, seed=cfg.run.seed * 1000 + step)
        batch, mask = rollout.batch, rollout.batch.loss_mask
        # 2. Score: old policy log-probs (learner) and teacher log-probs (teacher role).
        old_lp = learner_logprobs(learners, batch)
        teacher_lp = torch.cat(
            scorers.call_per_rank(
                "token_logprobs", [(b,) for b in split_batch(batch, len(scorers))]
            )
        )
        # 3. Rewards and returns (controller side: small [B, T] tensors).
        rewards = minillm_rewards(teacher_lp, old_lp, mask)
        adv = discounted_returns(
            rewards, mask, gamma=oc.gamma, length_normalize=oc.length_normalize
        )
        if oc.whiten:
            adv = whiten(adv, mask)
        # 4. Clipped policy-gradient updates (+ LM term on dataset responses).
        tensors = {**batch_tensors(batch), "old_logprobs": old_lp, "advantages": adv}
        _, lm_examples = next(lm_stream)
        lm = dataset_batch(lm_examples, ctx.pad_id)
        tensors.update({f"lm_{k}": v for k, v in lm.items()})
        for _ in range(oc.ppo_epochs):
            shards = to_micro_batches(tensors, world, grad_accum)
            metrics = mean_metrics(
                learners.call_per_rank(
                    "train_step",
                    [(s, reverse_kl_pg_loss) for s in shards],
                    clip_eps=oc.clip_eps,
                    lm_coef=oc.lm_coef,
                )
            )
        # 5. Push the new weights to the samplers.
        sync_weights(learners, rollouts)
        n_tok = mask.sum().clamp_min(1.0)
        metrics.update(
            reward=float((rewards * mask).sum() / n_tok),
            reverse_kl=float(-(rewards * mask).sum() / mask.shape[0]),
            response_tokens=float(n_tok / mask.shape[0]),
            sampler_mismatch=float(((rollout.logprobs - old_lp).abs() * mask).sum() / n_tok),
        )
        ctx.log(step + 1, oc.steps, metrics, t0)
        maybe_checkpoint(ctx, learners, step + 1, oc.steps)

    rollouts.shutdown()
    scorers.shutdown()
    return finish(ctx, learners, oc.steps, t0, metrics)
