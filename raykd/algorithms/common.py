"""What every training algorithm shares: its context, its roles, batching, checkpoints.

An algorithm module (``supervised``, ``word_kd``, ``onpolicy``, ...) reads top to bottom as
"build roles -> for step: gather data -> score -> train -> sync -> checkpoint". The plumbing
it needs lives here so that each algorithm file shows only its own method. Nothing here talks
to Ray directly: role groups (``raykd.roles``) do.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raykd.batch import (
    Example,
    Rollout,
    SequenceBatch,
    examples_to_batch,
    pad_rows,
    pad_sequences,
)
from raykd.roles.factory import (
    LearnerGroup,
    SlotPlacement,
    learner_group,
    sampler_group,
    scorer_group,
)
from raykd.roles.group import RoleGroup, shard
from raykd.rundir import RunDir

#: ``reporter(stage, step, total, metrics)``: where every logged step goes besides the run
#: directory (the console by default; a Tune trial reports to Tune).
Reporter = Callable[[str, int, int, dict], None]


def console_reporter(stage: str, step: int, total: int, metrics: dict) -> None:
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in _SHOWN)
    elapsed = metrics.get("elapsed_seconds", 0.0)
    print(f"[{stage}] step {step}/{total} {shown} ({elapsed:.0f}s)", flush=True)


_SHOWN = ("loss", "kd", "ce", "pg", "reward", "kl_ref", "lm", "grad_norm")


@dataclass
class StageContext:
    """Everything a training stage needs; built by the pipeline."""

    cfg: Any  # RunConfig (DictConfig)
    params: Any  # this stage's algorithm parameters (its section merged with the stage entry)
    rundir: RunDir
    stage: str  # unique stage name in this run, e.g. "1-word_kd"
    student_in: str  # model directory the stage starts from
    student_out: str  # model directory the stage must write
    teacher_path: str
    train: list[Example]
    pad_id: int
    tokenizer_path: str
    placement: SlotPlacement | None = None  # bundles reserved for the run (a Tune trial)
    reporter: Reporter = console_reporter
    extra: dict = field(default_factory=dict)
    heldout: list[Example] = field(default_factory=list)  # eval split, for periodic evals
    learners: LearnerGroup | None = None  # set by StageRoles.learners while the stage trains

    def log(self, step: int, total: int, metrics: dict[str, float], t0: float) -> None:
        """Record one step (run directory + reporter). A reporter with ``eval_every = N > 0``
        also gets ``heldout_ce`` every N steps and at the stage's last step: the student's
        cross-entropy on the first ``reporter.eval_examples`` held-out examples, computed by
        the learners with their current weights (:func:`heldout_metrics`)."""
        every = getattr(self.reporter, "eval_every", 0) or 0
        if every and self.learners is not None and self.heldout:
            if step % every == 0 or step == total:
                n = getattr(self.reporter, "eval_examples", 0) or len(self.heldout)
                metrics = {
                    **metrics,
                    **heldout_metrics(self.learners, self.heldout[:n], self.pad_id),
                }
        self.rundir.log(self.stage, step, metrics)
        self.reporter(self.stage, step, total, {**metrics, "elapsed_seconds": time.time() - t0})


# ---- where a step's time goes ----------------------------------------------------------
def _union_seconds(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of ``intervals`` clipped to ``[lo, hi]``."""
    total, reach = 0.0, lo
    for begin, end in sorted(intervals):
        begin, end = max(begin, reach), min(end, hi)
        if end > begin:
            total += end - begin
            reach = end
    return total


class StepTimer:
    """Per-phase timings of one training step, logged as ``time/*`` metrics (seconds).

    ``with timer.phase(name, *groups, **named_groups):`` around a phase of the step:

    * ``time/<name>``: the controller's wall time in the block (what the step waited);
    * ``time/<key>`` for each of ``named_groups``: the seconds that group's actors were
      inside calls made in the block (for phases whose groups work at the same time, e.g.
      teacher scoring beside the learners' old log-probs);
    * ``time/ray_overhead``: summed over the phases, the wall time during which none of the
      phase's actors was inside a call: driver wait minus time inside actors (scheduling,
      argument and result transfer, serialisation). A phase without groups is controller work
      and adds nothing to it;
    * ``time/step``: from the timer's creation to :meth:`metrics`; ``time/controller``: the
      part of it outside every phase (batching, advantages, ...);
    * ``restarts/<group name>``, only in a step where it happened: how many of the group's
      actors died and were replaced during its phases (:attr:`RoleGroup.restarts`).

    Actors report their own ``(start, end)`` wall clock per call (:attr:`RoleGroup.busy`);
    on one node the clocks agree, across nodes they are as close as the nodes' clocks.
    """

    def __init__(self):
        self._t0 = time.time()
        self.seconds: dict[str, float] = {}
        self._overhead = 0.0
        self._phased = 0.0
        self.restarts: dict[str, int] = {}

    def _add(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    @contextlib.contextmanager
    def phase(self, name: str, *groups: RoleGroup, **named_groups: RoleGroup | None):
        named = {k: g for k, g in named_groups.items() if g is not None}
        every = list(groups) + list(named.values())
        marks = [g.busy_mark() for g in every]
        restarts = {id(g): (g, g.restarts) for g in every}
        lo = time.time()
        try:
            yield
        finally:
            hi = time.time()
            for g, before in restarts.values():
                if g.restarts > before:
                    self.restarts[g.name] = self.restarts.get(g.name, 0) + g.restarts - before
            busy = [g.busy_since(m) for g, m in zip(every, marks)]
            self._add(name, hi - lo)
            self._phased += hi - lo
            for (key, _), intervals in zip(named.items(), busy[len(groups) :]):
                self._add(key, _union_seconds(intervals, lo, hi))
            if every:
                inside = _union_seconds([iv for b in busy for iv in b], lo, hi)
                self._overhead += max(0.0, (hi - lo) - inside)

    def metrics(self) -> dict[str, float]:
        step = time.time() - self._t0
        return {
            **{f"time/{k}": v for k, v in self.seconds.items()},
            "time/ray_overhead": self._overhead,
            "time/controller": max(0.0, step - self._phased),
            "time/step": step,
            **{f"restarts/{k}": float(v) for k, v in self.restarts.items()},
        }


# ---- roles -------------------------------------------------------------------------------
class StageRoles(contextlib.ExitStack):
    """The role groups of one stage; leaving the ``with`` block shuts all of them down, on
    every exit path (a step that raises included)."""

    def __init__(self, ctx: StageContext):
        super().__init__()
        self.ctx = ctx

    def _keep(self, group: RoleGroup) -> Any:
        self.callback(group.shutdown)
        return group

    def learners(
        self, model_path: str, lr: float | None = None, extra: dict | None = None
    ) -> LearnerGroup:
        """``learner.num_ranks`` DeepSpeed ranks; ``extra``: more :meth:`Learner.setup` keys
        (e.g. colocated ``teachers``)."""
        cfg = self.ctx.cfg
        lc = cfg.learner
        setup = {
            "zero_stage": lc.zero_stage,
            "lr": lr if lr is not None else lc.lr,
            "weight_decay": lc.weight_decay,
            "betas": list(lc.betas),
            "warmup_steps": lc.warmup_steps,
            "micro_batch_size": lc.micro_batch_size,
            "grad_accum": lc.grad_accum,
            "grad_clip": lc.grad_clip,
            "gradient_checkpointing": lc.gradient_checkpointing,
            "trainable": cfg.student.trainable,
            "seed": cfg.run.seed,
            **(extra or {}),
        }
        group = self._keep(learner_group(cfg, model_path, setup, placement=self.ctx.placement))
        self.ctx.learners = group
        return group

    def scorers(
        self, model_path: str | None = None, dtype: str | None = None, slot: str = "teacher"
    ) -> RoleGroup:
        """Teacher scorers (``teacher`` section); ``model_path``/``dtype`` load another frozen
        model on the same resources instead, e.g. GRPO's reference policy (``slot``: whose
        reserved bundles it takes in a Tune trial; ``reference`` when the teacher also runs)."""
        path = model_path or self.ctx.teacher_path
        name = "teacher" if model_path is None else "reference"
        group = scorer_group(
            self.ctx.cfg, path, dtype=dtype, name=name, placement=self.ctx.placement, slot=slot
        )
        return self._keep(group)

    def samplers(
        self, model_path: str, mix_teacher: str | None = None, slot: str = "rollout"
    ) -> RoleGroup:
        """Rollout workers holding ``model_path`` (and the teacher, for teacher-mixed
        sampling); ``slot="teacher_rollout"`` for a second, teacher-held set."""
        group = sampler_group(
            self.ctx.cfg,
            model_path,
            mix_teacher=mix_teacher,
            slot=slot,
            placement=self.ctx.placement,
        )
        return self._keep(group)


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
def resume(ctx: StageContext, learners: LearnerGroup) -> tuple[int, dict]:
    """Load the stage's last checkpoint into the learners; return ``(step to start at, the
    checkpoint's client state)`` (``(0, {})`` without one or with ``run.resume=false``)."""
    if not ctx.cfg.run.resume:
        return 0, {}
    state = learners.load_checkpoint(str(ctx.rundir.checkpoint_dir(ctx.stage)))
    if state is None:
        return 0, {}
    step = int(state["step"])
    print(f"[{ctx.stage}] resuming from checkpoint at step {step}", flush=True)
    return step, state


def maybe_checkpoint(
    ctx: StageContext, learners: LearnerGroup, step: int, total: int, state: dict | None = None
) -> None:
    """Every ``pipeline.checkpoint_every`` steps (not at the end): a DeepSpeed checkpoint with
    client state ``{"step": step, **state}``."""
    every = ctx.cfg.pipeline.checkpoint_every
    if every and step % every == 0 and step < total:
        ckpt = str(ctx.rundir.checkpoint_dir(ctx.stage))
        learners.save_checkpoint(ckpt, {"step": step, **(state or {})})


def finish(ctx: StageContext, learners: LearnerGroup, steps: int, t0: float, last: dict) -> dict:
    """Export the trained student (atomic, safetensors) and summarise the stage."""
    learners.export(ctx.student_out, ctx.tokenizer_path)
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
    ctx: StageContext, samplers: RoleGroup, examples, seed: int, mix_alpha: float = 0.0
) -> Rollout:
    """Sample one response per example, prompts sharded over the samplers (worker ``r``
    seeded ``seed + r``)."""
    rc = ctx.cfg.rollout
    calls = [
        (([ex.prompt_ids for ex in s],), {"uids": [ex.uid for ex in s], "seed": seed + rank})
        for rank, s in enumerate(shard(list(examples), len(samplers)))
        if len(s)
    ]
    parts = samplers.map_calls(
        "generate",
        calls,
        max_new_tokens=rc.max_new_tokens,
        temperature=rc.temperature,
        top_p=rc.top_p,
        mix_alpha=mix_alpha,
    )
    return merge_rollouts(parts, ctx.pad_id)


def learner_logprobs(learners: LearnerGroup, batch: SequenceBatch) -> torch.Tensor:
    """``log q_old`` of the sampled tokens under the learners' current weights."""
    shards = to_micro_batches(batch_tensors(batch), len(learners), 1)
    parts = learners.forward_logprobs([s[0] for s in shards])
    out = torch.zeros_like(batch.loss_mask)
    row = 0
    for p in parts:
        out[row : row + p.shape[0], : p.shape[1]] = p
        row += p.shape[0]
    return out * batch.loss_mask


def heldout_metrics(learners: LearnerGroup, examples: list[Example], pad_id: int) -> dict:
    """``heldout_ce``: mean cross-entropy per response token of ``examples`` under the
    learners' current weights (one forward, no update; every rank takes part)."""
    rows = list(examples)
    while len(rows) < len(learners):  # every rank needs a row
        rows += list(examples)
    batch = examples_to_batch(rows, pad_id)
    lp = learner_logprobs(learners, batch)
    return {"heldout_ce": float(-lp.sum() / batch.loss_mask.sum().clamp_min(1.0))}


def split_batch(batch: SequenceBatch, n: int) -> list[SequenceBatch]:
    """At most ``n`` contiguous non-empty row shards of ``batch``."""
    rows = list(range(len(batch)))
    return [batch.select(list(r)) for r in shard(rows, n) if len(r)]


def scored_logprobs(scorers: RoleGroup, batch: SequenceBatch) -> torch.Tensor:
    """``log p(y_t)`` of every given token under the scorers' model, ``[B, T]`` (0 off the
    loss mask); rows sharded over the scorers (fewer rows than scorers is fine)."""
    return start_scored_logprobs(scorers, batch)()


def start_scored_logprobs(scorers: RoleGroup, batch: SequenceBatch) -> Callable[[], torch.Tensor]:
    """Start :func:`scored_logprobs` and return a function that waits for its result, so that
    the scorers work while the controller calls other roles."""
    calls = [((part,), {}) for part in split_batch(batch, len(scorers))]
    refs = scorers.start_calls("token_logprobs", calls)
    return lambda: torch.cat(scorers.wait(refs))
