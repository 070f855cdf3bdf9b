"""Engine settings of the vLLM actors, their ``runtime_env``, and building the engine.

Settings come from the role's ``vllm`` config section (``rollout.vllm`` / ``teacher.vllm``,
see :class:`raykd.config.schema.VLLMConfig`) as a plain dict. The actor process is vLLM's
virtualenv; its interpreter is ``vllm.python``, else ``$RAYKD_VLLM_PYTHON``, else
``<repo>/.venv-vllm/bin/python``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]
EXTENSION = "raykd.roles.vllm.extension.WeightSyncExtension"  # module.Class

#: Defaults of every engine setting (the schema's ``VLLMConfig`` mirrors them).
DEFAULTS: dict[str, Any] = {
    "python": None,  # interpreter of vLLM's venv
    "enforce_eager": True,  # no torch.compile / CUDA graphs (fast start; CPU default)
    "gpu_memory_utilization": 0.5,  # GPU: share of the device for weights + KV cache
    "kv_cache_gb": 1.0,  # CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE)
    "max_model_len": None,  # None: the model's context length
    "prefix_caching": True,
    "multiprocessing": False,  # engine core in its own process (object_store sync needs False)
    "tensor_parallel_size": 1,
    "max_logprobs": None,  # scorer: None = max(teacher.top_k, 20)
    "stop": [],  # sampler: extra stop strings
    "enable_sleep_mode": False,  # GPU: colocated engines release memory while learners train
}


def settings_of(section) -> dict[str, Any]:
    """The engine settings of a role's config section (its ``vllm`` sub-section, if any),
    over :data:`DEFAULTS`; unknown keys are an error."""
    given = getattr(section, "vllm", None) if section is not None else None
    if given is None and isinstance(section, dict):
        given = section.get("vllm")
    given = _plain(given) or {}
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown vLLM engine settings {sorted(unknown)}; valid: {sorted(DEFAULTS)}"
        )
    return {**DEFAULTS, **given}


def _plain(value):
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # vLLM's venv need not have omegaconf
        pass
    return dict(value) if value is not None else None


def vllm_python(settings: dict[str, Any]) -> str:
    """The interpreter of vLLM's virtualenv (see the module docstring)."""
    return (
        settings.get("python")
        or os.environ.get("RAYKD_VLLM_PYTHON")
        or str(REPO / ".venv-vllm" / "bin" / "python")
    )


def process_env(settings: dict[str, Any], threads: int | None = None) -> dict[str, str]:
    """Environment variables vLLM reads at import / engine start."""
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if settings["multiprocessing"] else "0",
        "VLLM_CPU_KVCACHE_SPACE": f"{settings['kv_cache_gb']:g}",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # cores are shared with other actors
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CONFIGURE_LOGGING": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def runtime_env(settings: dict[str, Any]) -> dict[str, Any]:
    """Ray ``runtime_env`` of a vLLM actor: vLLM's interpreter and its environment, with the
    system allocator (``LD_PRELOAD`` of ``ray.allocator`` cleared: vLLM manages its memory)."""
    env = {**process_env(settings), "LD_PRELOAD": ""}
    return {"py_executable": vllm_python(settings), "env_vars": env}


def actor_runtime_env(section, given: dict | None = None) -> dict[str, Any]:
    """The ``runtime_env`` of a vLLM sampler or scorer built from config ``section``: vLLM's
    own, with the user's ``given`` one merged over it."""
    from raykd.roles.backends import merged_runtime_env

    return merged_runtime_env(runtime_env(settings_of(section)), given)


def activation_dtype(model_path: str, dtype: str) -> str:
    """The dtype vLLM computes in: ``dtype``, except for a GPTQ-packed checkpoint (a
    ``quantization_config`` in its ``config.json``) asked for in float32 -- vLLM's GPTQ
    kernels take bfloat16/float16 activations only, so it runs in bfloat16 (logged)."""
    config = Path(model_path) / "config.json"
    if dtype not in ("float32", "fp32") or not config.is_file():
        return dtype
    if "quantization_config" not in json.loads(config.read_text()):
        return dtype
    logger.warning("%s is GPTQ-packed: vLLM computes it in bfloat16, not %s", model_path, dtype)
    return "bfloat16"


def build_engine(
    model_path: str,
    dtype: str,
    settings: dict[str, Any],
    threads: int | None = None,
    max_logprobs: int = 20,
):
    """An in-process ``vllm.LLM`` with raykd's worker extension (call inside the actor)."""
    for key, value in process_env(settings, threads).items():
        os.environ.setdefault(key, value)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # Ray sets 1 for fractional-CPU actors
    import torch

    if threads:
        torch.set_num_threads(threads)  # vLLM's CPU worker disables set_num_threads later
    from vllm import LLM

    kwargs: dict[str, Any] = dict(
        model=model_path,
        dtype=activation_dtype(model_path, dtype),
        enforce_eager=settings["enforce_eager"],
        enable_prefix_caching=settings["prefix_caching"],
        tensor_parallel_size=settings["tensor_parallel_size"],
        max_logprobs=max_logprobs,
        worker_extension_cls=EXTENSION,
        seed=0,
    )
    if settings["max_model_len"]:
        kwargs["max_model_len"] = settings["max_model_len"]
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = settings["gpu_memory_utilization"]
        kwargs["enable_sleep_mode"] = settings["enable_sleep_mode"]
    return LLM(**kwargs)


def tokens_prompt(ids) -> dict:
    """A token-id prompt for ``LLM.generate``."""
    return {"prompt_token_ids": [int(t) for t in ids]}


def venv_problem(settings: dict[str, Any] | None = None) -> str | None:
    """Why vLLM actors cannot start here (no interpreter at :func:`vllm_python`), or None."""
    python = vllm_python(settings or DEFAULTS)
    if not os.path.exists(python):
        return f"vLLM's virtualenv is missing: no {python} (build it with `make install-vllm`)"
    return None
