"""Load-time checks of a merged config: ranges, choices, stages, cross-field rules.

Everything that can be checked from the config alone is checked here, before a Ray node starts
or a model loads. Each problem becomes one line naming the key, the value, what is allowed and
the file (or command-line override) that set it; all problems are reported at once.

Rules are tables: ``{section: {key: check}}`` for the top-level sections, and the same per
stage algorithm, applied to the algorithm's section *and* to every stage's merged parameters
(so a bad value fails whether or not a stage uses it yet).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from raykd.config.quant import METHODS as QUANT_METHODS
from raykd.config.quant import (
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    VLLM_GPTQ_BITS,
    check_quant_config,
)

Check = Callable[[Any], str | None]  # None when fine, else what is allowed

DTYPES = ("float32", "float16", "bfloat16", "auto")
DENSE_OBJECTIVES = ("divergence", "taid")
HIDDEN_KINDS = ("mse", "cosine")
GKD_OFF_POLICY = ("dataset", "teacher")
SCALE_REWARDS = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
STAGE_TRAINS = ("student", "teacher")
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---- checks ----------------------------------------------------------------------------
def one_of(*choices) -> Check:
    def check(v):
        return None if v in choices else f"expected one of {list(choices)}"

    return check


def number(lo=None, hi=None, *, lo_open=False, hi_open=False, optional=False) -> Check:
    """``lo <= v <= hi`` (open ends with ``lo_open`` / ``hi_open``); None allowed if optional."""

    def check(v):
        if v is None:
            return None if optional else "a number is required"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return "must be a number"
        if lo is not None and (v <= lo if lo_open else v < lo):
            return _range(lo, hi, lo_open, hi_open)
        if hi is not None and (v >= hi if hi_open else v > hi):
            return _range(lo, hi, lo_open, hi_open)
        return None

    return check


def _range(lo, hi, lo_open, hi_open) -> str:
    if hi is None:
        return f"must be {'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"must be {'<' if hi_open else '<='} {hi}"
    return f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


AT_LEAST_1 = number(1)
NON_NEGATIVE = number(0)
POSITIVE = number(0, lo_open=True)
OPTIONAL_POSITIVE = number(0, lo_open=True, optional=True)
UNIT = number(0, 1)


def _each(check: Check) -> Check:
    def inner(values):
        for v in values or []:
            err = check(v)
            if err:
                return f"every entry {err}"
        return None

    return inner


def _names_in(table_fn: Callable[[], dict], what: str) -> Check:
    def check(v):
        table = table_fn()
        return None if v in table else f"unknown {what}; valid: {sorted(table)}"

    return check


def _samplers():
    from raykd.roles.backends import SAMPLERS

    return SAMPLERS


def _scorers():
    from raykd.roles.backends import SCORERS

    return SCORERS


def _weight_syncs():
    from raykd.roles.weight_sync import STRATEGIES

    return ["auto", *STRATEGIES]


def _tasks():
    from raykd.data.tasks import TASKS

    return TASKS


def _divergences():
    from raykd.losses import OBJECTIVES

    return OBJECTIVES


def _loss_types():
    from raykd.losses import LOSS_TYPES

    return dict.fromkeys(LOSS_TYPES)


def _rewards():
    from raykd.rewards import REWARDS

    return REWARDS


def _sandbox_layers():
    from raykd.sandbox.core import ALIASES, LAYERS

    return {**dict.fromkeys(LAYERS), **ALIASES}


def _optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


# ---- tables ----------------------------------------------------------------------------
SECTION_RULES: dict[str, dict[str, Check]] = {
    "run": {"seed": NON_NEGATIVE},
    "ray": {"allocator": one_of("jemalloc", "system")},  # raykd.roles.runtime.ALLOCATORS
    "teacher": {
        "dtype": one_of(*DTYPES),
        "backend": _names_in(_scorers, "scorer backend"),
        "num_workers": AT_LEAST_1,
        "cpus_per_worker": NON_NEGATIVE,
        "gpus_per_worker": NON_NEGATIVE,
        "num_threads": number(1, optional=True),
        "max_restarts": NON_NEGATIVE,
        "top_k": AT_LEAST_1,
        "batch_size": AT_LEAST_1,
        "prefetch_steps": NON_NEGATIVE,
    },
    "student": {
        "init": one_of("from_teacher", "pretrained", "config", "width"),
        "rule": one_of("every_other", "first_last", "angular", "explicit"),
        "keep": number(1, optional=True),
        "calibration_prompts": AT_LEAST_1,
        "trainable": one_of("all", "layers"),
        "target_non_embedding_params": number(1, optional=True),
        "width_axes": _each(one_of("mlp", "heads", "hidden")),
        "width_sizes": lambda v: (
            None
            if set(v or {})
            <= {"hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"}
            and all(number(1)(x) is None for x in (v or {}).values())
            else "sizes: hidden_size, intermediate_size, "
            "num_attention_heads, num_key_value_heads, each >= 1"
        ),  # fmt: skip
        "width_multiple": AT_LEAST_1,
        "width_importance": one_of("mean_abs", "l2"),
    },
    "data": {
        "task": _names_in(_tasks, "task"),
        "max_length": number(8),
        "num_train": number(1, optional=True),
        "num_eval": number(0, optional=True),
        "eval_fraction": number(0, 1, lo_open=True, hi_open=True),
        "eval_task": _optional(_names_in(_tasks, "task")),
    },
    "learner": {
        "num_ranks": AT_LEAST_1,
        "cpus_per_rank": NON_NEGATIVE,
        "gpus_per_rank": NON_NEGATIVE,
        "num_threads": number(1, optional=True),
        "zero_stage": one_of(0, 1, 2, 3),
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "betas": _each(number(0, 1, hi_open=True)),
        "warmup_steps": NON_NEGATIVE,
        "micro_batch_size": AT_LEAST_1,
        "grad_accum": AT_LEAST_1,
        "grad_clip": NON_NEGATIVE,
        "loss_chunk_size": AT_LEAST_1,
        "max_bad_steps": AT_LEAST_1,
    },
    "rollout": {
        "backend": _names_in(_samplers, "sampler backend"),
        "dtype": one_of(*DTYPES),
        "num_workers": AT_LEAST_1,
        "cpus_per_worker": NON_NEGATIVE,
        "gpus_per_worker": NON_NEGATIVE,
        "num_threads": number(1, optional=True),
        "max_restarts": NON_NEGATIVE,
        "weight_sync": _names_in(_weight_syncs, "weight sync strategy"),
        "sync_bucket_mb": POSITIVE,
        "batch_size": AT_LEAST_1,
        "max_new_tokens": AT_LEAST_1,
        "temperature": POSITIVE,
        "top_p": number(0, 1, lo_open=True),
    },
    "eval": {
        "batch_size": AT_LEAST_1,
        "max_new_tokens": AT_LEAST_1,
        "temperature": POSITIVE,
        "num_report_samples": NON_NEGATIVE,
        "pass_k": _each(AT_LEAST_1),
        "exec_timeout_s": POSITIVE,
        "humaneval_max_new_tokens": AT_LEAST_1,
        "humaneval_problems": number(1, optional=True),
    },
    "pipeline": {"checkpoint_every": NON_NEGATIVE},
    "quantize": {
        "methods": _each(one_of(*QUANT_METHODS)),
        "bits": one_of(*SUPPORTED_BITS),
        "group_size": one_of(*SUPPORTED_GROUP_SIZES),
        "damp_percent": number(0, 1, lo_open=True),
        "calibration": AT_LEAST_1,
        "max_calibration_tokens": number(10),
        "dtype": one_of("float32", "float16", "bfloat16"),
        "cpus": NON_NEGATIVE,
        "gpus": NON_NEGATIVE,
        "num_threads": number(1, optional=True),
        "measure_prompts": NON_NEGATIVE,
        "measure_new_tokens": AT_LEAST_1,
    },
}

#: ``rollout.vllm`` / ``teacher.vllm`` (vLLM engine settings).
VLLM_RULES: dict[str, Check] = {
    "gpu_memory_utilization": number(0, 1, lo_open=True),
    "kv_cache_gb": POSITIVE,
    "max_model_len": number(1, optional=True),
    "tensor_parallel_size": AT_LEAST_1,
    "max_logprobs": number(1, optional=True),
}

_COMMON = {"steps": AT_LEAST_1, "lr": OPTIONAL_POSITIVE}

ALGORITHM_RULES: dict[str, dict[str, Check]] = {
    "sft": dict(_COMMON),
    "word_kd": {
        **_COMMON,
        "alpha": UNIT,
        "temperature": POSITIVE,
        "divergence": _names_in(_divergences, "divergence"),
    },
    "dense_kd": {
        **_COMMON,
        "objective": one_of(*DENSE_OBJECTIVES),
        "alpha": UNIT,
        "temperature": POSITIVE,
        "divergence": _names_in(_divergences, "divergence"),
        "taid_t_start": UNIT,
        "taid_t_end": UNIT,
        "hidden_weight": NON_NEGATIVE,
        "hidden_kind": one_of(*HIDDEN_KINDS),
    },
    "reverse_kl": {
        **_COMMON,
        "prompts_per_step": AT_LEAST_1,
        "gamma": UNIT,
        "clip_eps": POSITIVE,
        "ppo_epochs": AT_LEAST_1,
        "lm_coef": NON_NEGATIVE,
        "mix_alpha": number(0, 1, hi_open=True),
        "max_importance_weight": OPTIONAL_POSITIVE,
        "single_step_coef": NON_NEGATIVE,
    },
    "seqkd": {**_COMMON, "samples_per_prompt": AT_LEAST_1},
    "gkd": {
        **_COMMON,
        "lmbda": UNIT,
        "off_policy": one_of(*GKD_OFF_POLICY),
        "beta": UNIT,
        "temperature": POSITIVE,
    },
    "grpo": {
        **_COMMON,
        "prompts_per_step": AT_LEAST_1,
        "group_size": AT_LEAST_1,
        "epsilon": POSITIVE,
        "epsilon_high": OPTIONAL_POSITIVE,
        "beta": NON_NEGATIVE,
        "kl_estimator": one_of(*KL_ESTIMATORS),
        "loss_type": _names_in(_loss_types, "GRPO loss type"),
        "scale_rewards": one_of(*SCALE_REWARDS),
        "rewards": _each(_names_in(_rewards, "reward")),
        "ppo_epochs": AT_LEAST_1,
        "reward_tasks": NON_NEGATIVE,
        "reward_timeout_s": OPTIONAL_POSITIVE,
        "reward_cpus_per_task": NON_NEGATIVE,
        "sandbox_require": _each(_names_in(_sandbox_layers, "sandbox layer")),
        "teacher_logprob_weight": NON_NEGATIVE,
    },
}


def _cross_checks(section: str, params: DictConfig) -> list[tuple[str, str]]:
    """``(key, problem)`` pairs that involve more than one key of an algorithm's params."""
    out: list[tuple[str, str]] = []
    if section in ("word_kd", "dense_kd") and params.divergence in _divergences():
        from raykd.losses.registry import validate_params

        try:
            kwargs = OmegaConf.to_container(params.divergence_kwargs, resolve=True)
            validate_params(
                params.divergence, kwargs, topk_targets=section == "word_kd",
                exclude=("temperature", "chunk_size"),
            )  # fmt: skip
        except ValueError as err:
            out.append(("divergence_kwargs", str(err)))
    if section == "grpo" and all(r in _rewards() for r in params.rewards):
        from raykd.rewards import combine

        weights = list(params.reward_weights) if params.reward_weights is not None else None
        try:
            combine(
                list(params.rewards),
                weights,
                OmegaConf.to_container(params.reward_kwargs, resolve=True),
            )
        except ValueError as err:
            out.append(("rewards", str(err)))
    return out


# ---- the validator ---------------------------------------------------------------------
class Problems:
    """Collects one-line problems, each attributed to the source that set its key."""

    def __init__(self, origins: dict[str, str]):
        self.origins, self.lines = origins, []

    def source(self, key: str) -> str:
        parts = re.sub(r"\[\d+\]", "", key).split(".")
        for n in range(len(parts), 0, -1):
            got = self.origins.get(".".join(parts[:n]))
            if got:
                return got
        return "defaults"

    def add(self, key: str, value: Any, problem: str) -> None:
        self.lines.append(f"{self.source(key)}: config key '{key}' = {value!r}: {problem}")

    def add_plain(self, key: str, problem: str) -> None:
        self.lines.append(f"{self.source(key)}: config key '{key}': {problem}")


def _apply(rules: dict[str, Check], values, prefix: str, problems: Problems, keys=None) -> None:
    for key, check in rules.items():
        if keys is not None and key not in keys:
            continue
        value = values.get(key) if hasattr(values, "get") else None
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        err = check(value)
        if err:
            problems.add(f"{prefix}{key}", value, err)


def validate_config(cfg: DictConfig, origins: dict[str, str]) -> list[str]:
    """Every problem of ``cfg`` as one line each (empty when the config is sound)."""
    from raykd.config.stages import stage_params

    problems = Problems(origins)
    for section, rules in SECTION_RULES.items():
        _apply(rules, cfg[section], f"{section}.", problems)
    for section, rules in ALGORITHM_RULES.items():
        _apply(rules, cfg[section], f"{section}.", problems)
        for key, err in _cross_checks(section, cfg[section]):
            problems.add_plain(f"{section}.{key}", err)
    _student_checks(cfg, problems)
    _quantize_checks(cfg, problems)
    _run_checks(cfg, problems)
    _backend_checks(cfg, problems)

    stages = OmegaConf.to_container(cfg.pipeline.stages, resolve=True) or []
    names: set[str] = set()
    seen_student = False
    for i, stage in enumerate(stages):
        where = f"pipeline.stages[{i}]"
        name, algo = stage.get("name"), stage.get("algorithm")
        if algo not in ALGORITHM_RULES:
            problems.add(f"{where}.algorithm", algo, f"expected one of {sorted(ALGORITHM_RULES)}")
            continue
        if not isinstance(name, str) or not _STAGE_NAME.match(name):
            problems.add(f"{where}.name", name, "must match [A-Za-z0-9][A-Za-z0-9_.-]*")
        elif name in names or name in ("student", "data"):
            problems.add(
                f"{where}.name", name, "stage names must be unique (and not 'student'/'data')"
            )
        names.add(name)
        trains = stage.get("trains", "student")
        if trains not in STAGE_TRAINS:
            problems.add(f"{where}.trains", trains, f"expected one of {list(STAGE_TRAINS)}")
        elif trains == "teacher":
            if algo != "sft":
                problems.add(f"{where}.trains", trains, "only an sft stage can train the teacher")
            if seen_student:
                problems.add(f"{where}.trains", trains, "teacher stages come before student stages")
        else:
            seen_student = True
        try:
            params = stage_params(cfg, stage)
        except ValueError as err:
            problems.add_plain(where, str(err))
            continue
        own = set(stage) - {"name", "algorithm", "trains"}
        _apply(ALGORITHM_RULES[algo], params, f"{where}.", problems, keys=own)
        for key, err in _cross_checks(algo, params):
            if key in own:
                problems.add_plain(f"{where}.{key}", err)
    return problems.lines


def _student_checks(cfg: DictConfig, problems: Problems) -> None:
    sc = cfg.student
    if sc.init == "from_teacher" and sc.rule == "explicit":
        if not sc.layers:
            problems.add_plain("student.layers", "student.rule=explicit needs a list of indices")
    elif sc.init == "from_teacher" and sc.keep is None and sc.rule != "every_other":
        problems.add_plain("student.keep", f"student.rule={sc.rule} needs 'student.keep'")
    if sc.init == "pretrained" and not sc.model:
        problems.add_plain("student.model", "student.init=pretrained needs 'student.model'")
    if (
        sc.init == "width"
        and sc.target_non_embedding_params is None
        and not any((sc.width_sizes or {}).values())
    ):
        problems.add_plain(
            "student.target_non_embedding_params",
            "student.init=width needs a target (student.target_non_embedding_params) "
            "or sizes (student.width_sizes)",
        )


def _quantize_checks(cfg: DictConfig, problems: Problems) -> None:
    """Quantization settings against the student's shape where the config gives it
    (``student.init=config``); for a student cut from a teacher the pipeline checks them
    against the teacher's ``config.json`` before any model loads."""
    qc = cfg.quantize
    if qc.enabled and not qc.methods:
        problems.add_plain("quantize.methods", "quantize.enabled=true needs at least one method")
    if qc.enabled and cfg.rollout.backend == "vllm":
        # the quantized students are evaluated by the rollout backend: vLLM's GPTQ path
        # (AutoGPTQConfig) takes symmetric 4- or 8-bit codes only (its CPU kernel: 4-bit)
        if not qc.sym:
            problems.add(
                "quantize.sym", qc.sym, "rollout.backend=vllm loads symmetric GPTQ only: set true"
            )
        if qc.bits not in VLLM_GPTQ_BITS:
            problems.add(
                "quantize.bits", qc.bits, f"rollout.backend=vllm loads GPTQ bits {VLLM_GPTQ_BITS}"
            )
    if cfg.student.init != "config" or not cfg.student.model_config:
        return
    if qc.bits not in SUPPORTED_BITS or qc.group_size not in SUPPORTED_GROUP_SIZES:
        return  # already reported
    try:
        check_quant_config(
            OmegaConf.to_container(cfg.student.model_config, resolve=True),
            qc.bits, qc.group_size,
        )  # fmt: skip
    except (ValueError, KeyError) as err:
        problems.add_plain("quantize.group_size", f"{err} (student.model_config)")


def _run_checks(cfg: DictConfig, problems: Problems) -> None:
    name = cfg.run.name
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        problems.add("run.name", name, "must be one plain directory name inside run.output_dir")
    rk = cfg.reverse_kl
    if rk.mix_alpha > 0 and (cfg.rollout.temperature != 1.0 or cfg.rollout.top_p != 1.0):
        problems.add_plain(
            "reverse_kl.mix_alpha",
            "> 0 samples the teacher-student mixture at temperature 1: set "
            "'rollout.temperature' = 1.0 and 'rollout.top_p' = 1.0",
        )


def _backend_checks(cfg: DictConfig, problems: Problems) -> None:
    """vLLM engine settings, and what the chosen sampler backend can do."""
    for section in ("rollout", "teacher"):
        _apply(VLLM_RULES, cfg[section].vllm, f"{section}.vllm.", problems)
    rc, tc = cfg.rollout, cfg.teacher
    max_logprobs = tc.vllm.max_logprobs
    if tc.backend == "vllm" and max_logprobs is not None and max_logprobs < tc.top_k:
        problems.add(
            "teacher.vllm.max_logprobs", max_logprobs,
            f"must be >= teacher.top_k ({tc.top_k}): the engine returns at most that many",
        )  # fmt: skip
    if rc.backend not in _samplers() or rc.weight_sync not in _weight_syncs():
        return  # already reported
    from raykd.roles.backends import sampler_class, weight_sync_name

    caps, sync = sampler_class(rc.backend).capabilities, weight_sync_name(rc)
    if sync not in caps.weight_sync:
        problems.add(
            "rollout.weight_sync", rc.weight_sync,
            f"rollout.backend={rc.backend} takes {['auto', *caps.weight_sync]}",
        )  # fmt: skip
    if rc.backend == "vllm" and rc.vllm.multiprocessing and sync == "object_store":
        problems.add_plain(
            "rollout.weight_sync",
            "object_store sync needs the in-process vLLM engine: set "
            "rollout.vllm.multiprocessing=false or rollout.weight_sync=torch_group",
        )
    if not caps.teacher_mixing and cfg.reverse_kl.mix_alpha > 0:
        problems.add_plain(
            "reverse_kl.mix_alpha",
            f"> 0 needs a sampler that holds the teacher; rollout.backend={rc.backend} does "
            "not (use rollout.backend=hf)",
        )
