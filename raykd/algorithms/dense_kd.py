"""Off-policy KD on dataset responses against full teacher logits, teachers colocated.

The teacher(s) live in each learner actor next to the student (``Learner.setup(teachers=)``),
so full-vocabulary teacher logits are computed where they are consumed and never cross
actors. Per response token ``t`` of a dataset example, with student logits ``z_S`` and
teacher logits ``z_T``::

    divergence:  L = alpha * tau^2 * D(p_T^tau || p_S^tau)  + (1 - alpha) * CE(y_t)
    taid:        L = alpha * tau^2 * KL(p_t || p_S^tau)     + (1 - alpha) * CE(y_t)
                 p_t = softmax(((1 - t) * sg(z_S) + t * z_T) / tau),  t from TAIDSchedule
    hidden:      L += hidden_weight * mean_l H(P(h_S^l), h_T^{g(l)})

``D`` is any divergence in :mod:`raykd.losses` (forward KL by default). With several teachers
``z_T = log mean_k softmax(z_k)`` (the ensemble's log-probs, valid logits; see
:func:`raykd.losses.ensemble_teacher_logprobs`). ``H`` is MSE or cosine distance between the
student's hidden state after block ``l`` (projected by the learned ``model.raykd_projector``)
and the first teacher's after block ``g(l)`` (:func:`raykd.losses.uniform_layer_map`), on
the positions whose logits are trained. The projector is saved in checkpoints, not exported.

TAID's ``t`` is owned here by a :class:`raykd.losses.TAIDSchedule` (adaptive, driven by each
step's TAID objective) and sent with every step; its state rides in the checkpoint's client
state, so a resumed run continues the same ``t`` trajectory.

Loop: build learners (+ colocated teachers) -> for step: batch -> train -> checkpoint -> export.
"""

from __future__ import annotations

import time

import torch

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
from raykd.batch import token_logprobs
from raykd.losses import (
    TAIDSchedule,
    ensemble_teacher_logprobs,
    hidden_state_loss,
    hinton_kd_loss,
    masked_mean,
    taid_loss,
    uniform_layer_map,
)

OBJECTIVES = ("divergence", "taid")
HIDDEN_KINDS = ("mse", "cosine")


@torch.no_grad()
def _teacher_forward(teachers, mb, want_hidden: bool):
    """Teacher logits (one teacher's, or the ensemble's log-probs) and the first teacher's
    hidden states (or None)."""
    logits, hidden = [], None
    for i, teacher in enumerate(teachers):
        out = teacher(
            input_ids=mb["input_ids"],
            attention_mask=mb["attention_mask"],
            output_hidden_states=want_hidden and i == 0,
        )
        logits.append(out.logits.float())
        if want_hidden and i == 0:
            hidden = out.hidden_states
    return (logits[0] if len(logits) == 1 else ensemble_teacher_logprobs(logits)), hidden


def _hidden_loss(model, student_hidden, teacher_hidden, mask, kind):
    """Mean over student blocks of ``H(P(h_S^l), h_T^{g(l)})``; ``hidden_states[0]`` is the
    embedding output, so block ``l`` is entry ``l + 1``."""
    projector = getattr(getattr(model, "module", model), "raykd_projector", None)
    layer_map = uniform_layer_map(len(student_hidden) - 1, len(teacher_hidden) - 1)
    terms = [
        hidden_state_loss(
            student_hidden[ls + 1][:, :-1], teacher_hidden[lt + 1][:, :-1], mask, projector, kind
        )
        for ls, lt in enumerate(layer_map)
    ]
    return torch.stack(terms).mean()


def dense_kd_loss(
    model,
    mb,
    *,
    teachers,
    objective,
    alpha,
    temperature,
    divergence,
    divergence_kwargs,
    taid_t,
    hidden_weight,
    hidden_kind,
    chunk_size,
):
    """Learner-side loss of one micro-batch; ``teachers`` are the actor's colocated models."""
    want_hidden = hidden_weight > 0
    teacher_logits, teacher_hidden = _teacher_forward(teachers, mb, want_hidden)
    out = model(
        input_ids=mb["input_ids"],
        attention_mask=mb["attention_mask"],
        output_hidden_states=want_hidden,
    )
    # logits[:, t] predicts token t+1: pair the view logits[:, :-1] with [:, 1:] targets.
    logits, targets, mask = out.logits[:, :-1], mb["input_ids"][:, 1:], mb["loss_mask"][:, 1:]
    if objective == "divergence":
        loss, metrics = hinton_kd_loss(
            logits,
            targets,
            mask,
            teacher_logits=teacher_logits[:, :-1],
            alpha=alpha,
            temperature=temperature,
            divergence=divergence,
            divergence_kwargs=dict(divergence_kwargs),
            chunk_size=chunk_size,
        )
    else:
        kd = masked_mean(
            taid_loss(
                logits,
                teacher_logits[:, :-1],
                mask,
                t=taid_t,
                temperature=temperature,
                chunk_size=chunk_size,
            ),
            mask,
        )
        ce = masked_mean(-token_logprobs(out.logits, mb["input_ids"])[:, 1:], mask)
        loss = alpha * temperature**2 * kd + (1.0 - alpha) * ce
        metrics = {"kd": kd.item(), "ce": ce.item(), "t": float(taid_t)}
    if want_hidden:
        hidden = _hidden_loss(model, out.hidden_states, teacher_hidden, mask, hidden_kind)
        loss = loss + hidden_weight * hidden
        metrics["hidden"] = hidden.item()
    metrics["loss"] = loss.item()
    return loss, metrics


def run(ctx: StageContext) -> dict:
    cfg, kc = ctx.cfg, ctx.params
    t0 = time.time()
    schedule = TAIDSchedule(kc.taid_t_start, kc.taid_t_end, total_steps=kc.steps)

    with StageRoles(ctx) as roles:
        # 1. Learners with the teacher(s) colocated, resumed from the stage checkpoint if any
        #    (TAID's t trajectory rides in the checkpoint's client state).
        teachers = [ctx.teacher_path, *kc.extra_teachers]
        extra = {"teachers": teachers, "hidden_projection": kc.hidden_weight > 0}
        learners = roles.learners(ctx.student_in, kc.lr, extra=extra)
        start, state = resume(ctx, learners)
        if state.get("taid"):
            schedule.load_state_dict(state["taid"])
        loss_kwargs = dict(
            objective=kc.objective,
            alpha=kc.alpha,
            temperature=kc.temperature,
            divergence=kc.divergence,
            divergence_kwargs=dict(kc.divergence_kwargs),
            hidden_weight=kc.hidden_weight,
            hidden_kind=kc.hidden_kind,
            chunk_size=cfg.learner.loss_chunk_size,
        )

        # 2. Train.
        metrics: dict = {}
        stream = example_stream(ctx.train, global_batch_size(cfg), cfg.run.seed, start)
        for step, examples in stream:
            if step >= kc.steps:
                break
            timer = StepTimer()
            tensors = dataset_batch(examples, ctx.pad_id)
            shards = to_micro_batches(tensors, len(learners), cfg.learner.grad_accum)
            with timer.phase("learner", learners):
                metrics = learners.train_step(
                    shards, dense_kd_loss, taid_t=schedule.t, **loss_kwargs
                )
            if kc.objective == "taid":
                schedule.step(metrics["kd"])  # t for the next step
            metrics.update(timer.metrics())
            ctx.log(step + 1, kc.steps, metrics, t0)
            maybe_checkpoint(ctx, learners, step + 1, kc.steps, {"taid": schedule.state_dict()})

        return finish(ctx, learners, kc.steps, t0, metrics)
