"""Sequence-level KD (Kim & Rush 2016) and SCoTD (Li et al. 2023).

The teacher writes the training data: for every training prompt ``x`` it samples ``N``
responses ``y^(1..N) ~ p_T(. | x')``, and the student is fine-tuned on them by cross-entropy::

    L = - (1 / |y|) * sum_t log q_S(y_t | x, y_<t)       for (x, y) in teacher samples

``x' = x`` (sequence-level KD), or, with ``seqkd.teacher_instruction`` (SCoTD), the user turn
with an instruction appended that asks the teacher for its chain of thought; the student
still sees only ``x`` and learns to produce the rationale and the answer unprompted.

The samples are written once to ``<run>/data/<stage>-teacher_samples.jsonl`` (atomically) and
reused by a resumed run, so the teacher decodes every prompt only once.

Loop: teacher rollout workers sample N responses per prompt -> the supervised loop
(``supervised.train_cross_entropy``) on those samples.
"""

from __future__ import annotations

import json
import time

from raykd.algorithms.common import StageContext, StageRoles, sample_rollouts
from raykd.algorithms.supervised import train_cross_entropy
from raykd.atomic import atomic_write_text
from raykd.batch import Example
from raykd.data import prompt_only
from raykd.data.records import TaskRecord
from raykd.models import load_tokenizer


def teacher_prompts(ctx: StageContext, instruction: str) -> list[Example]:
    """The prompts the teacher samples from: the training prompts, with ``instruction``
    appended to the user turn when given (same chat template and system prompt)."""
    if not instruction:
        return list(ctx.train)
    tokenizer = load_tokenizer(ctx.tokenizer_path)
    return [
        prompt_only(
            TaskRecord(ex.uid, f"{ex.prompt_text}\n\n{instruction}", ex.reference, ex.meta),
            tokenizer,
            ctx.cfg.data.system_prompt,
        )
        for ex in ctx.train
    ]


def teacher_samples(ctx: StageContext) -> list[Example]:
    """``samples_per_prompt`` teacher responses per training prompt (cached in the run dir)."""
    cfg, sc = ctx.cfg, ctx.params
    path = ctx.rundir.path("data", f"{ctx.stage}-teacher_samples.jsonl")
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [Example(r["uid"], r["prompt_ids"], r["response_ids"]) for r in rows]
    prompts = teacher_prompts(ctx, sc.teacher_instruction)
    out: list[Example] = []
    teacher_ids: list[list[int]] = []
    with StageRoles(ctx) as roles:
        rollouts = roles.samplers(ctx.teacher_path)
        for n in range(sc.samples_per_prompt):
            batch_size = cfg.rollout.batch_size * len(rollouts)
            for start in range(0, len(ctx.train), batch_size):
                chunk = prompts[start : start + batch_size]
                rollout = sample_rollouts(ctx, rollouts, chunk, seed=cfg.run.seed * 7919 + n)
                for i, ex in enumerate(ctx.train[start : start + batch_size]):
                    resp = rollout.batch.input_ids[i][rollout.batch.loss_mask[i].bool()]
                    if len(resp):  # the student's example: its own prompt, the teacher's answer
                        out.append(Example(f"{ex.uid}#t{n}", ex.prompt_ids, resp.tolist()))
                        teacher_ids.append(chunk[i].prompt_ids)
            print(
                f"[{ctx.stage}] teacher sample {n + 1}/{sc.samples_per_prompt} written", flush=True
            )
    lines = [
        json.dumps(
            {
                "uid": e.uid,
                "prompt_ids": e.prompt_ids,
                "response_ids": e.response_ids,
                "teacher_prompt_ids": t,
            }  # fmt: skip
        )
        for e, t in zip(out, teacher_ids, strict=True)
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return out


def run(ctx: StageContext) -> dict:
    sc = ctx.params
    t0 = time.time()
    samples = teacher_samples(ctx)
    ctx.rundir.log(ctx.stage, 0, {"teacher_samples": len(samples)})
    summary = train_cross_entropy(ctx, samples, sc.steps, sc.lr, t0)
    return {**summary, "teacher_samples": len(samples)}
