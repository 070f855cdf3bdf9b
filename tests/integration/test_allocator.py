"""The node's workers run with the allocator of ``ray.allocator`` (jemalloc by default): the
library is mapped into a real worker process, with its no-decay setting."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_workers_preload_jemalloc(ray_node):
    import ray

    @ray.remote(num_cpus=0)
    def mapped() -> tuple[bool, str | None]:
        import os

        with open("/proc/self/maps") as f:
            return any("libjemalloc" in line for line in f), os.environ.get("MALLOC_CONF")

    loaded, conf = ray.get(mapped.remote())
    assert loaded and conf == "dirty_decay_ms:-1,muzzy_decay_ms:-1"
