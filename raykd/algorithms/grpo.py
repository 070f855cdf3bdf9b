"""GRPO (Shao et al. 2024) with rule-based, execution and teacher-scored rewards.

Per step, ``prompts_per_step`` prompts ``x`` are each sampled ``G = group_size`` times from the
current student (rollout workers): responses ``y_1 .. y_G`` with scalar rewards::

    r_i = sum_j w_j R_j(x, y_i)  +  w_T (1/|y_i|) sum_t log p_T(y_it | x, y_i<t)

The first term is ``grpo.rewards``/``reward_weights`` (batch rewards, see
:mod:`raykd.rewards`, run in process or as ``grpo.reward_tasks`` Ray tasks; ``execution``
runs the problem's tests on the response's code in the sandbox, whose required layers
``grpo.sandbox_require`` are checked before any role starts). The second is the dense teacher
term, on when ``w_T = grpo.teacher_logprob_weight > 0``: teacher scorers give the log-prob of
every sampled response token, and its **mean** over the response tokens (not the sum, which
would favour short responses, since log-probs are <= 0) is added to the sequence's reward
before the group normalisation (logged as ``teacher_logprob``). Group-relative advantages,
one per response and broadcast over its tokens::

    A_i  = (r_i - mean_g(r)) / (std(r) + eps)     std of the group | batch, or 1 for "none"
    rho_t = pi_theta(y_t) / pi_old(y_t)
    l_t  = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps_high) A_i) + beta k(pi_theta, pi_ref)_t

aggregated over the response tokens by ``loss_type`` (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``;
see :mod:`raykd.losses.grpo`). ``pi_old`` is the student at sampling time (log-probs recomputed
by the learners); ``pi_ref`` is the stage's starting student, frozen and held by a scorer group
(only when ``beta > 0``); ``k`` is the KL estimator (``k3``: ``exp(-d) + d - 1``, d = log ratio).

Loop: learners, rollout workers (+ reference scorers) -> for step: sample groups -> rewards ->
advantages -> log pi_old (+ log pi_ref) -> ``ppo_epochs`` clipped updates on the batch -> sync
weights -> checkpoint; each step's phases are timed (``time/*``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from raykd.algorithms.common import (
    StageContext,
    StageRoles,
    StepTimer,
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
from raykd.roles.reward_tasks import score_with_parts
from raykd.sandbox import Sandbox


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
    if "execution" in gc.rewards and gc.sandbox_require:  # checked where the programs run
        params.setdefault("execution", {}).setdefault("require", list(gc.sandbox_require))
    weights = list(gc.reward_weights) if gc.reward_weights is not None else None
    return combine(list(gc.rewards), weights, params)


def check_sandbox(gc) -> str | None:
    """With the execution reward (or ``sandbox_require``): the sandbox's layers here, as one
    line; raises :class:`raykd.sandbox.SandboxUnavailable` (the probe's reason) when a
    required layer is missing, so the stage refuses to train."""
    if "execution" not in gc.rewards and not gc.sandbox_require:
        return None
    return Sandbox(require=list(gc.sandbox_require)).describe()


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append JSON lines (never glued onto a line a kill cut short)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as fh:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if fh.tell():
            with open(path, "rb") as rd:
                rd.seek(-1, 2)
                if rd.read(1) != b"\n":
                    text = "\n" + text
        fh.write(text.encode())


def mean_response_logprob(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]``: ``sum_t m_t lp_t / max(1, sum_t m_t)``, the mean log-prob per response token."""
    return (logprobs * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def run(ctx: StageContext) -> dict:
    cfg, gc = ctx.cfg, ctx.params
    reward_fn = reward_function(gc)
    sandbox = check_sandbox(gc)
    if sandbox:
        print(f"[{ctx.stage}] sandbox {sandbox}", flush=True)
    completions_log = ctx.rundir.path("data", f"{ctx.stage}-completions.jsonl")
    t0 = time.time()

    with StageRoles(ctx) as roles:
        # 1. Roles: learners (resumed if a checkpoint exists), samplers, the frozen reference.
        learners = roles.learners(ctx.student_in, gc.lr)
        start, _ = resume(ctx, learners)
        samplers = roles.samplers(ctx.student_in)
        if start:
            learners.sync_weights(samplers)
        # The teacher's slot holds the teacher when it scores rewards; the reference then
        # takes a slot of its own.
        teacher = roles.scorers() if gc.teacher_logprob_weight > 0 else None
        reference = None
        if gc.beta:
            slot = "reference" if teacher is not None else "teacher"
            reference = roles.scorers(ctx.student_in, "float32", slot=slot)
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
            timer = StepTimer()
            # 2. Sample a group of responses per prompt (groups contiguous, each its own draw).
            group = [ex for ex in examples for _ in range(gc.group_size)]
            with timer.phase("sampling", samplers):
                rollout = sample_rollouts(ctx, samplers, group, seed=cfg.run.seed * 1000 + step)
            batch, mask = rollout.batch, rollout.batch.loss_mask
            # 3. Rewards (a batch function, in process or as Ray tasks) and group-relative
            #    advantages (controller side: B floats).
            t_reward = time.time()
            with timer.phase("rewards"):
                totals, parts = score_with_parts(
                    reward_fn,
                    group,
                    rollout.response_texts,
                    num_tasks=gc.reward_tasks,
                    cpus_per_task=gc.reward_cpus_per_task,
                    timeout_s=gc.reward_timeout_s,
                )
            reward_seconds = time.time() - t_reward
            rewards = torch.tensor(totals, dtype=torch.float32)
            if teacher is not None:  # dense teacher term, mean log p_T per response token
                with timer.phase("teacher_scoring", teacher):
                    teacher_lp = mean_response_logprob(scored_logprobs(teacher, batch), mask)
                parts["teacher_logprob"] = teacher_lp.tolist()
                rewards = rewards + gc.teacher_logprob_weight * teacher_lp
            if gc.save_completions:
                append_jsonl(completions_log, [
                    {"step": step + 1, "uid": ex.uid, "completion": text, "reward": float(r),
                     **{k: v[i] for k, v in parts.items()}}
                    for i, (ex, text, r) in enumerate(zip(group, rollout.response_texts, rewards))
                ])  # fmt: skip
            advantages = group_advantages(rewards, gc.group_size, gc.scale_rewards)
            # 4. log pi_old (learners) and log pi_ref (frozen reference) of the sampled tokens.
            with timer.phase("old_logprobs", learners):
                old_lp = learner_logprobs(learners, batch)
            tensors = {**batch_tensors(batch), "old_logprobs": old_lp, "advantages": advantages}
            if reference is not None:
                with timer.phase("reference_scoring", reference):
                    tensors["ref_logprobs"] = scored_logprobs(reference, batch)
            # 5. ppo_epochs clipped updates on this batch (pi_old stays the sampling-time
            #    policy, so from the second epoch on the ratio moves and the clip acts).
            #    DeepSpeed averages over ranks and micro-steps, so dapo's global token count is
            #    divided by both to give the exact global token mean.
            n_tokens = float(mask.sum())
            shards = to_micro_batches(tensors, world, grad_accum)
            for epoch in range(gc.ppo_epochs):
                with timer.phase("learner", learners):
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
            with timer.phase("weight_sync", learners, samplers):
                metrics.update(learners.sync_weights(samplers))
            metrics.update(
                reward=float(rewards.mean()),
                reward_std=float(rewards.std()) if len(rewards) > 1 else 0.0,
                response_length=n_tokens / len(rewards),
                reward_seconds=reward_seconds,
                **{f"reward/{k}": sum(v) / len(v) for k, v in parts.items()},
                **first,
            )
            metrics.update(timer.metrics())
            ctx.log(step + 1, gc.steps, metrics, t0)
            maybe_checkpoint(ctx, learners, step + 1, gc.steps)

        return {**finish(ctx, learners, gc.steps, t0, metrics),
                **({"sandbox": sandbox} if sandbox else {})}  # fmt: skip
