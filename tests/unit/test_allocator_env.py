"""``ray.allocator``: the environment that makes Ray's workers preload jemalloc, and the
ALLOCATORS list the config check names."""

from __future__ import annotations

import os

import pytest

from raykd.config.validate import SECTION_RULES
from raykd.roles.runtime import ALLOCATORS, JEMALLOC_CONF, allocator_env
from raykd.roles.vllm.engine import runtime_env


def test_jemalloc_env_preloads_rays_build_and_keeps_pages():
    env = allocator_env("jemalloc")
    assert env["LD_PRELOAD"].endswith(os.path.join("ray", "core", "libjemalloc.so"))
    assert os.path.isfile(env["LD_PRELOAD"])
    assert env["MALLOC_CONF"] == JEMALLOC_CONF == "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    assert allocator_env("system") == {}
    with pytest.raises(ValueError, match="ray.allocator='tcmalloc'"):
        allocator_env("tcmalloc")


def test_config_check_and_vllm_actors_agree_with_the_runtime():
    check = SECTION_RULES["ray"]["allocator"]
    assert all(check(a) is None for a in ALLOCATORS) and check("tcmalloc")
    # vLLM's actors clear the preload (the job-level env would otherwise reach them)
    assert runtime_env({"python": "/x/python", **_vllm_defaults()})["env_vars"]["LD_PRELOAD"] == ""


def _vllm_defaults() -> dict:
    from raykd.roles.vllm.engine import DEFAULTS

    return {k: v for k, v in DEFAULTS.items() if k != "python"}
