"""GRPO (Shao et al. 2024) with rule-based rewards.

Per step, ``prompts_per_step`` prompts ``x`` are each sampled ``G = group_size`` times from the
current student (rollout workers): responses ``y_1 .. y_G`` with scalar rewards
``r_i = sum_j w_j R_j(x, y_i)`` (``grpo.rewards``: batch rewards, see :mod:`raykd.rewards`,
run in process or as ``grpo.reward_tasks`` Ray tasks) and
group-relative advantages, one per response and broadcast over its tokens::

    A_i  = (r_i - mean_g(r)) / (std(r) + eps)     std of the group | batch, or 1 for "none"
    rho_t = pi_theta(y_t) / pi_old(y_t)
    l_t  = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps_high) A_i) + beta k(pi_theta, pi_ref)_t

aggregated over the response tokens by ``loss_type`` (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``;
see :mod:`raykd.losses.grpo`). ``pi_old`` is the student at sampling time (log-probs recomputed
by the learners); ``pi_ref`` is the stage's starting student, frozen and held by a scorer group
(only when ``beta > 0``); ``k`` is the KL estimator (``k3``: ``exp(-d) + d - 1``, d = log ratio).

Loop: learners, rollout workers (+ reference scorers) -> for step: sample groups -> rewards ->
advantages -> log pi_old (+ log pi_ref) -> ``ppo_epochs`` clipped updates on the batch -> sync
weights -> checkpoint.
"""

from __future__ import annotations

import time

import torch
from omegaconf import OmegaConf

from raykd.algorithms.common import (
    StageContext,
    StageRoles,
    batch_tensors,
    example_stream,
    finish,
    learner_logprobs,
    maybe_checkpoint,
    resume,
    sample_rollouts,
    scored_logprobs,
    to_micro_batches,
)
from raykd.batch import token_logprobs
from raykd.losses import group_advantages, grpo_loss
from raykd.rewards import combine
from raykd.roles.reward_tasks import score_completions


def grpo_policy_loss(model, mb, *, beta, **grpo_kwargs):
    """Learner-side loss of one micro-batch: the GRPO clipped surrogate (+ beta * KL to ref)."""
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    lp = token_logprobs(logits, mb["input_ids"])
    return grpo_loss(
        lp[:, 1:],
        mb["old_logprobs"][:, 1:],
        mb["advantages"],  # [B]: one per sequence, broadcast over its tokens
        mb["loss_mask"][:, 1:],
        beta=beta,
        ref_logprobs=mb["ref_logprobs"][:, 1:] if beta else None,
        **grpo_kwargs,
    )


def reward_function(gc):
    """The weighted sum of the named batch rewards; raises ValueError on unknown names."""
    params = OmegaConf.to_container(gc.reward_kwargs, resolve=True) if gc.reward_kwargs else {}
    weights = list(gc.reward_weights) if gc.reward_weights is not None else None
    return combine(list(gc.rewards), weights, params)


def run(ctx: StageContext) -> dict:
    cfg, gc = ctx.cfg, ctx.params
    reward_fn = reward_function(gc)
    t0 = time.time()

    with StageRoles(ctx) as roles:
        # 1. Roles: learners (resumed if a checkpoint exists), samplers, the frozen reference.
        learners = roles.learners(ctx.student_in, gc.lr)
        start, _ = resume(ctx, learners)
        samplers = roles.samplers(ctx.student_in)
        if start:
            learners.sync_weights(samplers)
        reference = roles.scorers(ctx.student_in, "float32") if gc.beta else None
        grad_accum, world = cfg.learner.grad_accum, len(learners)
        loss_kwargs = dict(
            epsilon=gc.epsilon,
            epsilon_high=gc.epsilon_high,
            beta=gc.beta,
            kl_estimator=gc.kl_estimator,
            loss_type=gc.loss_type,
            max_completion_length=cfg.rollout.max_new_tokens,
        )

        metrics: dict = {}
        for step, examples in example_stream(ctx.train, gc.prompts_per_step, cfg.run.seed, start):
            if step >= gc.steps:
                break
            # 2. Sample a group of responses per prompt (groups contiguous, each its own draw).
            group = [ex for ex in examples for _ in range(gc.group_size)]
            rollout = sample_rollouts(ctx, samplers, group, seed=cfg.run.seed * 1000 + step)
            batch, mask = rollout.batch, rollout.batch.loss_mask
            # 3. Rewards (a batch function, in process or as Ray tasks) and group-relative
            #    advantages (controller side: B floats).
            rewards = torch.tensor(
                score_completions(
                    reward_fn,
                    group,
                    rollout.response_texts,
                    num_tasks=gc.reward_tasks,
                    timeout_s=gc.reward_timeout_s,
                ),
                dtype=torch.float32,
            )
            advantages = group_advantages(rewards, gc.group_size, gc.scale_rewards)
            # 4. log pi_old (learners) and log pi_ref (frozen reference) of the sampled tokens.
            tensors = {
                **batch_tensors(batch),
                "old_logprobs": learner_logprobs(learners, batch),
                "advantages": advantages,
            }
            if reference is not None:
                tensors["ref_logprobs"] = scored_logprobs(reference, batch)
            # 5. ppo_epochs clipped updates on this batch (pi_old stays the sampling-time
            #    policy, so from the second epoch on the ratio moves and the clip acts).
            #    DeepSpeed averages over ranks and micro-steps, so dapo's global token count is
            #    divided by both to give the exact global token mean.
            n_tokens = float(mask.sum())
            shards = to_micro_batches(tensors, world, grad_accum)
            for epoch in range(gc.ppo_epochs):
                metrics = learners.train_step(
                    shards,
                    grpo_policy_loss,
                    num_items_in_batch=max(n_tokens, 1.0) / (world * grad_accum),
                    **loss_kwargs,
                )
                if epoch == 0:  # the policy as sampled: ratio 1, KL to the reference as it was
                    first = {f"first_epoch/{k}": metrics[k]
                             for k in ("clip_ratio/region_mean", "kl") if k in metrics}  # fmt: skip
            # 6. Push the new weights to the samplers.
            metrics.update(learners.sync_weights(samplers))
            metrics.update(
                reward=float(rewards.mean()),
                reward_std=float(rewards.std()) if len(rewards) > 1 else 0.0,
                response_length=n_tokens / len(rewards),
                **first,
            )
            ctx.log(step + 1, gc.steps, metrics, t0)
            maybe_checkpoint(ctx, learners, step + 1, gc.steps)

        return finish(ctx, learners, gc.steps, t0, metrics)
