"""Checks before anything trains, from what config files and model headers can tell.

:func:`check_run` runs right after the teacher is resolved, before a tokenizer or model is
loaded: a run that cannot work fails in about a second with a message naming the culprit,
not minutes later inside a learner with a shape error.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from raykd.config.stages import stage_params
from raykd.models import config_vocab_size, resolve_model


class PreflightError(ValueError):
    """The config asks for a run that cannot train; the message names the keys and sizes."""


def _student_vocab(cfg) -> tuple[int | None, str]:
    """``(vocab_size, where it comes from)`` of the initial student; ``(None, ...)`` for a
    student cut from the teacher (it has the teacher's embeddings, hence its vocabulary)."""
    sc = cfg.student
    if sc.init == "pretrained":
        return config_vocab_size(resolve_model(sc.model)), f"student.model={sc.model}"
    if sc.init == "config":
        from transformers import AutoConfig

        params = OmegaConf.to_container(sc.model_config, resolve=True) or {}
        model_type = params.pop("model_type", None)
        if not model_type:
            return None, "student.model_config"  # from_config says what is missing
        size = getattr(AutoConfig.for_model(model_type, **params), "vocab_size", None)
        return size, "student.model_config" + ("" if "vocab_size" in params else " (default)")
    return None, "student.init=from_teacher"


def check_vocabularies(cfg, teacher_path: str) -> None:
    """Refuse a student, or an extra ensemble teacher (``dense_kd.extra_teachers`` of any
    stage), whose ``vocab_size`` differs from the teacher's: distillation compares the models'
    distributions token id by token id, so both need the same vocabulary.

    Reads ``config.json`` files only (no weights); raises :class:`PreflightError` naming both
    sizes and where each comes from."""
    teacher_vocab = config_vocab_size(teacher_path)
    if teacher_vocab is None:
        return
    others = [_student_vocab(cfg)]
    stages = OmegaConf.to_container(cfg.pipeline.stages, resolve=True) or []
    for stage in stages:
        if stage.get("algorithm") == "dense_kd":
            for extra in stage_params(cfg, stage).get("extra_teachers") or []:
                where = f"stage {stage.get('name')!r}: dense_kd.extra_teachers entry {extra}"
                others.append((config_vocab_size(resolve_model(extra)), where))
    for size, where in others:
        if size is not None and int(size) != teacher_vocab:
            raise PreflightError(
                f"vocabulary mismatch: {where} has vocab_size {size}, the teacher "
                f"({cfg.teacher.model}, {teacher_path}) has vocab_size {teacher_vocab}; "
                "distillation needs a student with the teacher's tokenizer and vocabulary"
            )


def check_run(cfg, teacher_path: str) -> None:
    """Every preflight check (today: :func:`check_vocabularies`); raises :class:`PreflightError`."""
    check_vocabularies(cfg, teacher_path)
