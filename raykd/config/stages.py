"""The pipeline's stage list: expanding the shorthands, and each stage's parameters.

A stage is ``{name, algorithm, trains?, ...params}``. Its parameters are the algorithm's config
section (``word_kd: {...}``, the defaults every stage of that algorithm shares) with the
entry's own keys merged over them, so ``word_kd`` may run twice with different settings and a
command-line override such as ``word_kd.steps=100`` still reaches every ``word_kd`` stage.

Shorthands, expanded at load time so the saved config holds the explicit list:
``pipeline.train: [word_kd, reverse_kl]`` (one stage per name, named ``1-word_kd``, ...) and
``pipeline.finetune_teacher: true`` (a first stage ``teacher-sft``: sft on the teacher with the
``teacher_sft`` section's values).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from raykd.config.schema import STAGE_SECTIONS

DEFAULT_STAGES = ("word_kd", "reverse_kl")
RESERVED = ("name", "algorithm", "trains")


def expand_stages(cfg: DictConfig) -> list[dict[str, Any]]:
    """The explicit stage list of ``cfg`` (names filled in); raises ValueError when the
    shorthand and the explicit form are both given."""
    pc = cfg.pipeline
    if pc.stages is not None and pc.train is not None:
        raise ValueError(
            "'pipeline.train' and 'pipeline.stages' are both set; 'pipeline.train: [a, b]' is "
            "shorthand for 'pipeline.stages: [{algorithm: a}, {algorithm: b}]': keep one"
        )
    if pc.stages is not None:
        entries = [dict(e) for e in OmegaConf.to_container(pc.stages, resolve=True)]
    else:
        names = list(pc.train) if pc.train is not None else list(DEFAULT_STAGES)
        entries = [{"algorithm": a} for a in names]
    if pc.finetune_teacher and not any(e.get("trains") == "teacher" for e in entries):
        tuned = OmegaConf.to_container(cfg.teacher_sft, resolve=True)
        entries.insert(0, {"name": "teacher-sft", "algorithm": "sft", "trains": "teacher", **tuned})
    n = 0
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError(f"a pipeline stage must be a mapping, got {entry!r}")
        trains = entry.setdefault("trains", "student")
        if trains == "student":
            n += 1
        if "name" not in entry:
            algo = entry.get("algorithm")
            entry["name"] = f"teacher-{algo}" if trains == "teacher" else f"{n}-{algo}"
    return entries


def stage_params(cfg: DictConfig, stage: dict[str, Any]) -> DictConfig:
    """The algorithm section of ``cfg`` with the stage entry's parameters merged over it
    (types and key names checked against the algorithm's schema)."""
    algo = stage["algorithm"]
    overrides = {k: v for k, v in stage.items() if k not in RESERVED}
    try:
        params = OmegaConf.merge(OmegaConf.structured(STAGE_SECTIONS[algo]), cfg[algo], overrides)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(getattr(err, "msg", err)).splitlines()[0]
        raise ValueError(f"bad parameter '{key}' for algorithm {algo!r}: {msg}") from None
    OmegaConf.set_readonly(params, True)
    return params
