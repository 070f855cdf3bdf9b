"""Building role groups from a run config: learners, teacher scorers, samplers.

Each builder reads its own config section (``learner``, ``teacher``, ``rollout``): how many
actors, the resources of each, the backend, a ``runtime_env``, and for the stateless roles
how often a dead actor may be replaced (``max_restarts``; learners hold training state and
are never replaced: see :class:`~raykd.roles.group.RoleGroup`). An actor's torch threads come
from its own reservation (``num_threads``, else its ``cpus_per_*`` rounded up), never from the
size of the cluster. Inside a reservation made by somebody else (a Tune trial), a
:class:`SlotPlacement` says which bundles each role's actors take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from ray.util.placement_group import PlacementGroup

from raykd.roles.backends import sampler_class, scorer_class, weight_sync_name
from raykd.roles.group import Placement, RoleGroup
from raykd.roles.learner import Learner
from raykd.roles.weight_sync import make_strategy


def actor_threads(num_cpus: float, num_threads: int | None = None) -> int:
    """Torch threads of one actor: ``num_threads`` if given, else its CPUs rounded up."""
    if num_threads:
        return int(num_threads)
    return max(1, math.ceil(num_cpus))


def _as_dict(section) -> dict[str, Any]:
    if section is None:
        return {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(section):
            return OmegaConf.to_container(section, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(section)


@dataclass
class SlotPlacement:
    """Bundle indices of a placement group reserved for a whole run, by role slot
    (``learner``, ``rollout``, ``teacher``, ``teacher_rollout``); stages run one after another,
    so each stage's groups reuse their slot's bundles."""

    pg: PlacementGroup
    slots: dict[str, list[int]] = field(default_factory=dict)

    def take(self, slot: str, num: int) -> Placement:
        indices = self.slots.get(slot, [])
        if len(indices) < num:
            raise ValueError(
                f"the run's reservation has {len(indices)} bundles for role '{slot}', {num} needed"
            )
        return Placement(self.pg, indices[:num])


def _placement(placement: SlotPlacement | None, slot: str, num: int) -> Placement | None:
    return placement.take(slot, num) if placement is not None else None


class LearnerGroup(RoleGroup):
    """DeepSpeed data-parallel learners; owns the weight-sync strategy to the samplers."""

    weight_sync: Any = None

    def train_step(self, per_rank_micro_batches: list, loss_fn, **loss_kwargs) -> dict:
        """One optimizer step on every rank; returns the metrics averaged over ranks."""
        per_rank = self.call_per_rank(
            "train_step", [(mbs, loss_fn) for mbs in per_rank_micro_batches], **loss_kwargs
        )
        keys = per_rank[0].keys()
        return {k: sum(m[k] for m in per_rank) / len(per_rank) for k in keys}

    def forward_logprobs(self, per_rank_batches: list[dict]) -> list[torch.Tensor]:
        """``forward_logprobs`` of one micro-batch per rank (every rank takes part)."""
        return self.call_per_rank("forward_logprobs", [(b,) for b in per_rank_batches])

    def sync_weights(self, samplers) -> dict[str, float]:
        """Push the current weights to ``samplers`` with this group's strategy. From then on a
        sampler of the group that dies and is rebuilt (it starts from the stage's initial
        weights) gets the learners' current weights before its calls are resent."""
        samplers.restore = self._resync
        return self.weight_sync.sync(self, samplers)

    def _resync(self, samplers, rank: int) -> None:
        self.weight_sync.forget()  # a process group built with the dead actor is gone
        self.weight_sync.sync(self, samplers)

    def load_checkpoint(self, ckpt_dir: str) -> dict | None:
        """The checkpoint's client state (``step`` and what the algorithm saved), or None."""
        return self.call("load_checkpoint", ckpt_dir)[0]

    def save_checkpoint(self, ckpt_dir: str, client_state: dict) -> None:
        self.call("save_checkpoint", ckpt_dir, client_state)

    def export(self, path: str, tokenizer_path: str) -> None:
        self.call("export", path, tokenizer_path)


def learner_group(
    cfg,
    model_path: str,
    setup: dict[str, Any],
    *,
    placement: SlotPlacement | None = None,
) -> LearnerGroup:
    """``learner.num_ranks`` DeepSpeed ranks on ``model_path``, joined and ready.

    ``setup``: the :meth:`Learner.setup` config (optimizer, ZeRO stage, ...); its
    ``max_bad_steps`` defaults to ``learner.max_bad_steps``."""
    lc = cfg.learner
    setup = {"max_bad_steps": lc.max_bad_steps, **setup}
    world = lc.num_ranks
    threads = actor_threads(lc.cpus_per_rank, lc.num_threads)
    group = LearnerGroup(
        Learner,
        world,
        num_cpus=lc.cpus_per_rank,
        num_gpus=lc.gpus_per_rank,
        make_args=lambda rank: ((rank, world, threads), {}),
        name="learner",
        placement=_placement(placement, "learner", world),
        runtime_env=_as_dict(lc.runtime_env) or None,
    )
    try:
        addr, port = group.call_rank(0, "rendezvous")
        group.call("setup", addr, port, model_path, setup)
        rc = cfg.rollout
        group.weight_sync = make_strategy(
            weight_sync_name(rc), rc.sync_bucket_mb, shm_dir=rc.shm_dir
        )
    except BaseException:
        group.shutdown()
        raise
    return group


def scorer_group(
    cfg,
    model_path: str,
    *,
    dtype: str | None = None,
    name: str = "teacher",
    placement: SlotPlacement | None = None,
    slot: str = "teacher",
) -> RoleGroup:
    """``teacher.num_workers`` frozen scorers of ``model_path`` (``teacher.backend``), on the
    bundles of ``slot`` when the run has a reservation."""
    tc = cfg.teacher
    cls = scorer_class(tc.backend)
    threads = actor_threads(tc.cpus_per_worker, tc.num_threads)
    dtype = dtype or tc.dtype
    extra = cls.config_kwargs(tc)  # backend settings, e.g. the vLLM engine's
    return RoleGroup(
        cls,
        tc.num_workers,
        num_cpus=tc.cpus_per_worker,
        num_gpus=tc.gpus_per_worker,
        make_args=lambda rank: ((model_path, dtype, threads), dict(extra)),
        name=name,
        placement=_placement(placement, slot, tc.num_workers),
        runtime_env=cls.runtime_env(tc, _as_dict(tc.runtime_env)),
        max_restarts=tc.max_restarts,
    )


def sampler_group(
    cfg,
    model_path: str,
    *,
    mix_teacher: str | None = None,
    slot: str = "rollout",
    placement: SlotPlacement | None = None,
) -> RoleGroup:
    """``rollout.num_workers`` samplers holding ``model_path`` (``rollout.backend``); with
    ``mix_teacher`` they hold the teacher too (teacher-mixed sampling)."""
    rc = cfg.rollout
    cls = sampler_class(rc.backend)
    if mix_teacher and not cls.capabilities.teacher_mixing:
        raise ValueError(
            f"rollout.backend={rc.backend!r} cannot sample a teacher-student mixture "
            "(reverse_kl.mix_alpha > 0); use rollout.backend=hf"
        )
    threads = actor_threads(rc.cpus_per_worker, rc.num_threads)
    extra = cls.config_kwargs(rc)  # backend settings, e.g. the vLLM engine's
    return RoleGroup(
        cls,
        rc.num_workers,
        num_cpus=rc.cpus_per_worker,
        num_gpus=rc.gpus_per_worker,
        make_args=lambda rank: (
            (model_path, rc.dtype, threads),
            {**extra, **({"mix_teacher": mix_teacher} if mix_teacher else {})},
        ),
        name=slot,
        placement=_placement(placement, slot, rc.num_workers),
        runtime_env=cls.runtime_env(rc, _as_dict(rc.runtime_env)),
        max_restarts=rc.max_restarts,
    )
