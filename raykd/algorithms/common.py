"""What every training algorithm shares: its context, role groups, batching, checkpoints.

An algorithm module (``supervised``, ``word_kd``, ``onpolicy``) reads top to bottom as
"build roles -> for step: gather data -> score -> train -> sync -> checkpoint". The plumbing
it needs lives here so that each algorithm file shows only its own method.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from raykd.batch import (
    Example,
    Rollout,
    SequenceBatch,
    examples_to_batch,
    pad_rows,
    pad_sequences,
)
from raykd.pipeline.rundir import RunDir
from raykd.roles.group import RoleGroup, shard
from raykd.roles.learner import Learner
from raykd.roles.rollout import RolloutWorker
from raykd.roles.runtime import cluster_cpus
from raykd.roles.teacher import TeacherScorer


@dataclass
class StageContext:
    """Everything a training stage needs; built by the pipeline."""

    cfg: Any  # RunConfig (DictConfig)
    rundir: RunDir
    stage: str  # unique stage name in this run, e.g. "1-word_kd"
    student_in: str  # model directory the stage starts from
    student_out: str  # model directory the stage must write
    teacher_path: str
    train: list[Example]
    pad_id: int
    tokenizer_path: str
    extra: dict = field(default_factory=dict)

    def log(self, step: int, total: int, metrics: dict[str, float], t0: float) -> None:
        self.rundir.log(self.stage, step, metrics)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in _SHOWN)
        print(f"[{self.stage}] step {step}/{total} {shown} ({time.time() - t0:.0f}s)", flush=True)


_SHOWN = ("loss", "kd", "ce", "pg", "reward", "kl_ref", "lm", "grad_norm")


def _threads(share: int) -> int:
    return max(1, cluster_cpus() // max(1, share))


# ---- role groups -------------------------------------------------------------------------
def make_learners(
    ctx: StageContext, model_path: str, lr: float | None = None, extra: dict | None = None
) -> RoleGroup:
    """A DeepSpeed data-parallel group of ``learner.num_ranks`` actors, set up and ready.

    ``extra``: more keys for :meth:`Learner.setup`'s ``cfg`` (e.g. colocated ``teachers``)."""
    lc = ctx.cfg.learner
    world = lc.num_ranks
    group = RoleGroup(
        Learner,
        world,
        num_cpus=lc.cpus_per_rank,
        num_gpus=lc.gpus_per_rank,
        make_args=lambda rank: ((rank, world, _threads(world)), {}),
        name="learner",
    )
    addr, port = group.call_rank(0, "rendezvous")
    setup_cfg = {
        "zero_stage": lc.zero_stage,
        "lr": lr if lr is not None else lc.lr,
        "weight_decay": lc.weight_decay,
        "betas": list(lc.betas),
        "warmup_steps": lc.warmup_steps,
        "micro_batch_size": lc.micro_batch_size,
        "grad_accum": lc.grad_accum,
        "grad_clip": lc.grad_clip,
        "gradient_checkpointing": lc.gradient_checkpointing,
        "trainable": ctx.cfg.student.trainable,
        "seed": ctx.cfg.run.seed,
        **(extra or {}),
    }
    group.call("setup", addr, port, model_path, setup_cfg)
    return group


def make_scorers(
    ctx: StageContext, model_path: str | None = None, dtype: str | None = None
) -> RoleGroup:
    """Teacher scorers (``teacher`` section); ``model_path``/``dtype`` load another frozen
    model on the same resources instead, e.g. GRPO's reference policy."""
    tc = ctx.cfg.teacher
    path = model_path or ctx.teacher_path
    dtype = dtype or tc.dtype
    return RoleGroup(
        TeacherScorer,
        tc.num_workers,
        num_cpus=tc.cpus_per_worker,
        num_gpus=tc.gpus_per_worker,
        make_args=lambda rank: ((path, dtype, _threads(tc.num_workers)), {}),
        name="teacher" if model_path is None else "reference",
    )


def make_rollouts(cfg, model_path: str, mix_teacher: str | None = None) -> RoleGroup:
    """Rollout workers holding ``model_path`` (and the teacher, for teacher-mixed sampling)."""
    rc = cfg.rollout
    if rc.backend != "hf":
        raise ValueError(f"rollout.backend={rc.backend!r} is not available in this build")
    return RoleGroup(
        RolloutWorker,
        rc.num_workers,
        num_cpus=rc.cpus_per_worker,
        num_gpus=rc.gpus_per_worker,
        make_args=lambda rank: (
            (model_path, "float32", _threads(rc.num_workers)),
            {"mix_teacher": mix_teacher},
        ),
        name="rollout",
    )


def sync_weights(learners: RoleGroup, rollouts: RoleGroup) -> None:
    """Learner rank 0 -> every rollout worker, through the object store (zero-copy tensors)."""

    refs = learners.call_async("state_dict")  # collective under ZeRO-3
    state_ref = refs[0]
    ray.get(refs[1:])
    ray.get([a.update_weights.remote(state_ref) for a in rollouts.actors])


# ---- data ----------------------------------------------------------------------------------
def example_stream(examples: list[Example], batch_size: int, seed: int, start_step: int = 0):
    """Endless deterministic stream of example batches: epoch ``e`` is a permutation seeded by
    ``(seed, e)``; resuming at ``start_step`` yields exactly what an unbroken run would."""
    if not examples:
        raise ValueError("the training split is empty: nothing to train on")
    n = len(examples)
    step = start_step
    while True:
        pos = step * batch_size
        epoch, offset = divmod(pos, n)
        order = list(range(n))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        idx = [order[(offset + i) % n] for i in range(batch_size)]
        yield step, [examples[i] for i in idx]
        step += 1


def global_batch_size(cfg) -> int:
    lc = cfg.learner
    return lc.micro_batch_size * lc.grad_accum * lc.num_ranks


def to_micro_batches(
    tensors: dict[str, torch.Tensor], world: int, grad_accum: int
) -> list[list[dict[str, torch.Tensor]]]:
    """Split a global batch (dict of ``[B, ...]`` tensors) into ``world`` rank shards of
    ``grad_accum`` micro-batches each. Each micro-batch is trimmed to its longest sequence
    (``lm_*`` tensors, a second dataset batch riding along, to their own longest)."""
    bsz = next(iter(tensors.values())).shape[0]
    rows = list(range(bsz))
    per_rank = []
    for rank_rows in shard(rows, world):
        mbs = []
        for mb_rows in shard(list(rank_rows), grad_accum):
            mb = {k: v[mb_rows] for k, v in tensors.items()}
            mbs.append({k: _trim(k, v, mb) for k, v in mb.items()})
        per_rank.append(mbs)
    return per_rank


def _trim(key: str, value: torch.Tensor, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cut padding columns: tensors named ``<prefix>x`` follow ``<prefix>attention_mask``."""
    if value.dim() < 2:
        return value
    prefix = key[: key.index("_") + 1] if key.startswith("lm_") else ""
    width = int(mb[f"{prefix}attention_mask"].sum(1).max())
    return value[:, :width]


def batch_tensors(batch: SequenceBatch) -> dict[str, torch.Tensor]:
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "loss_mask": batch.loss_mask,
    }


def dataset_batch(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    return batch_tensors(examples_to_batch(examples, pad_id))


def mean_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    keys = per_rank[0].keys()
    return {k: sum(m[k] for m in per_rank) / len(per_rank) for k in keys}


# ---- checkpoints -----------------------------------------------------------------------
def resume(ctx: StageContext, learners: RoleGroup) -> int:
    """Load the stage's last checkpoint into the learners; return the step to start at."""
    if not ctx.cfg.run.resume:
        return 0
    states = learners.call("load_checkpoint", str(ctx.rundir.checkpoint_dir(ctx.stage)))
    if states[0] is None:
        return 0
    step = int(states[0]["step"])
    print(f"[{ctx.stage}] resuming from checkpoint at step {step}", flush=True)
    return step


def maybe_checkpoint(ctx: StageContext, learners: RoleGroup, step: int, total: int) -> None:
    every = ctx.cfg.pipeline.checkpoint_every
    if every and step % every == 0 and step < total:
        learners.call("save_checkpoint", str(ctx.rundir.checkpoint_dir(ctx.stage)), {"step": step})


def finish(ctx: StageContext, learners: RoleGroup, steps: int, t0: float, last: dict) -> dict:
    """Export the trained student (atomic, safetensors) and summarise the stage."""
    learners.call("export", ctx.student_out, ctx.tokenizer_path)
    learners.shutdown()
    return {
        "steps": steps,
        "seconds": round(time.time() - t0, 1),
        "final_loss": last.get("loss"),
        "model": str(Path(ctx.student_out)),
    }


# ---- sampling and scoring helpers shared by the on-policy algorithms --------------------
def merge_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout from the workers' parts (re-padded to the longest sequence)."""
    seqs, masks, lps, tlps, texts, plens, uids = [], [], [], [], [], [], []
    for r in parts:
        for i in range(len(r.batch)):
            n = int(r.batch.attention_mask[i].sum())
            seqs.append(r.batch.input_ids[i, :n].tolist())
            masks.append(r.batch.loss_mask[i, :n].tolist())
            lps.append(r.logprobs[i, :n])
            if r.teacher_logprobs is not None:
                tlps.append(r.teacher_logprobs[i, :n])
        texts += r.response_texts
        plens += r.prompt_lengths
        uids += r.batch.uids
    batch = pad_sequences(seqs, masks, pad_id, uids)
    has_teacher = all(r.teacher_logprobs is not None for r in parts)
    teacher_lp = pad_rows(tlps, batch.loss_mask) if has_teacher else None
    return Rollout(batch, pad_rows(lps, batch.loss_mask), plens, texts, teacher_lp)


def sample_rollouts(
    ctx: StageContext, rollouts, examples, seed: int, mix_alpha: float = 0.0
) -> Rollout:
    """Sample one response per example, prompts sharded over the rollout workers."""
    rc = ctx.cfg.rollout
    prompts = [ex.prompt_ids for ex in examples]
    uids = [ex.uid for ex in examples]
    refs = [
        actor.generate.remote(
            list(p),
            uids=list(u),
            max_new_tokens=rc.max_new_tokens,
            temperature=rc.temperature,
            top_p=rc.top_p,
            seed=seed + rank,
            mix_alpha=mix_alpha,
        )
        for rank, (actor, p, u) in enumerate(
            zip(rollouts.actors, shard(prompts, len(rollouts)), shard(uids, len(rollouts)))
        )
        if len(p)
    ]
    return merge_rollouts(ray.get(refs), ctx.pad_id)


def learner_logprobs(learners, batch: SequenceBatch) -> torch.Tensor:
    """``log q_old`` of the sampled tokens under the learners' current weights."""
    tensors = batch_tensors(batch)
    shards = to_micro_batches(tensors, len(learners), 1)
    parts = learners.call_per_rank("forward_logprobs", [(s[0],) for s in shards])
    out = torch.zeros_like(batch.loss_mask)
    row = 0
    for p in parts:
        out[row : row + p.shape[0], : p.shape[1]] = p
        row += p.shape[0]
    return out * batch.loss_mask


def split_batch(batch: SequenceBatch, n: int) -> list[SequenceBatch]:
    rows = list(range(len(batch)))
    return [batch.select(list(r)) for r in shard(rows, n) if len(r)]
