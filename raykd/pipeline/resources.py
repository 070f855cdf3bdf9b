"""What a run reserves: the bundles its stages' role groups need, by role slot.

Stages run one after another and each shuts its groups down before the next starts, so a run
needs, per role slot, the most actors any one stage (or evaluation) holds at once:

* ``learner``: ``learner.num_ranks`` bundles of ``cpus/gpus_per_rank`` (every training stage);
* ``rollout``: ``rollout.num_workers`` (evaluation always decodes; on-policy stages sample);
* ``teacher``: ``teacher.num_workers`` (stages that score with the teacher or a reference);
* ``teacher_rollout``: a second sampler set, for GKD with fresh teacher samples;
* ``reference``: GRPO's frozen reference when the teacher scores rewards in the same stage;
* ``quantize``: one bundle of ``quantize.cpus/gpus`` for the quantize and measure tasks.

:func:`run_bundles` lists them after a driver bundle, in the order a Ray Tune
``PlacementGroupFactory`` wants (bundle 0 is the trial's driver); :func:`slot_indices` says
which bundle indices each slot owns, for :class:`raykd.roles.factory.SlotPlacement`.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from raykd.config.stages import stage_params

DRIVER_BUNDLE = {"CPU": 0.5}


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}


def stage_slots(cfg, stage: dict) -> set[str]:
    """The role slots one stage holds at once."""
    algo = stage["algorithm"]
    p = stage_params(cfg, stage)
    slots = {"learner"}
    if algo in ("reverse_kl", "grpo", "seqkd") or (algo == "gkd" and p.lmbda > 0):
        slots.add("rollout")
    if algo in ("word_kd", "gkd") or (algo == "reverse_kl" and p.mix_alpha == 0):
        slots.add("teacher")
    if algo == "grpo" and p.teacher_logprob_weight > 0:
        slots.add("teacher")  # the teacher scores the sampled responses (a reward term)
        if p.beta > 0:
            slots.add("reference")  # the frozen reference then needs bundles of its own
    elif algo == "grpo" and p.beta > 0:
        slots.add("teacher")  # the frozen reference runs on the teacher's resources
    if algo == "gkd" and p.off_policy == "teacher" and p.lmbda < 1:
        slots.add("teacher_rollout")
    return slots


def slot_bundles(cfg) -> dict[str, list[dict[str, float]]]:
    """Per slot, the bundles the whole run needs (evaluation included)."""
    stages = OmegaConf.to_container(cfg.pipeline.stages, resolve=True) or []
    used = {"rollout"}  # evaluation decodes through rollout workers
    for stage in stages:
        used |= stage_slots(cfg, stage)
    if cfg.quantize.enabled:
        used.add("quantize")
    lc, rc, tc, qc = cfg.learner, cfg.rollout, cfg.teacher, cfg.quantize
    sizes = {
        "learner": (lc.num_ranks, _bundle(lc.cpus_per_rank, lc.gpus_per_rank)),
        "rollout": (rc.num_workers, _bundle(rc.cpus_per_worker, rc.gpus_per_worker)),
        "teacher": (tc.num_workers, _bundle(tc.cpus_per_worker, tc.gpus_per_worker)),
        "teacher_rollout": (rc.num_workers, _bundle(rc.cpus_per_worker, rc.gpus_per_worker)),
        "reference": (tc.num_workers, _bundle(tc.cpus_per_worker, tc.gpus_per_worker)),
        "quantize": (1, _bundle(qc.cpus, qc.gpus)),
    }
    return {s: [dict(b) for _ in range(n)] for s, (n, b) in sizes.items() if s in used}


def run_bundles(cfg) -> list[dict[str, float]]:
    """``[driver, *every slot's bundles]``: what a Tune trial running ``cfg`` reserves."""
    out = [dict(DRIVER_BUNDLE)]
    for bundles in slot_bundles(cfg).values():
        out.extend(bundles)
    return out


def slot_indices(cfg) -> dict[str, list[int]]:
    """Bundle indices of each slot in :func:`run_bundles` (index 0 is the driver)."""
    out, i = {}, 1
    for slot, bundles in slot_bundles(cfg).items():
        out[slot] = list(range(i, i + len(bundles)))
        i += len(bundles)
    return out
