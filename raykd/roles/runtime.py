"""Starting or joining Ray with the settings raykd's roles rely on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid

import ray

from raykd.roles.reaper import TOKEN_VAR

# Set before ray.init and forwarded to every worker: torch tensors travel through the object
# store zero-copy (a 135M fp32 state_dict: ~0.5 s put instead of 3-4.5 s with pickling).
WORKER_ENV = {
    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # no weight-loading bars from every actor
}


#: ``ray.allocator`` choices: the memory allocator of the node's worker processes.
ALLOCATORS = ("jemalloc", "system")
#: jemalloc that keeps freed pages for reuse: glibc returns every freed tensor over 32 MiB
#: (logits, embedding gradients) to the kernel, and each step faults fresh zeroed pages back
#: in (~520k page faults per learner step of the 24-layer student); kept, they are reused.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def allocator_env(allocator: str = "jemalloc") -> dict[str, str]:
    """Environment that makes a worker process use ``allocator``: ``jemalloc`` preloads the
    build Ray ships (``ray/core/libjemalloc.so``) with :data:`JEMALLOC_CONF`; ``system`` (or a
    Ray without it) changes nothing. Measured on the on-policy step of the quickstart student
    (benchmarks/onpolicy_step.py, 2 cores): learner update 6.3 -> 4.1 s, peak memory +1.6 GiB."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"ray.allocator={allocator!r}: expected one of {list(ALLOCATORS)}")
    library = os.path.join(os.path.dirname(ray.__file__), "core", "libjemalloc.so")
    if allocator == "system" or not os.path.isfile(library):
        return {}
    return {"LD_PRELOAD": library, "MALLOC_CONF": JEMALLOC_CONF}


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    allocator: str = "jemalloc",
):
    """Join ``address`` (a cluster, e.g. under ``ray job submit``) or start an embedded node.

    The embedded node binds loopback only and has no dashboard, so laptops and CI stay local.
    Idempotent: an already initialised Ray is reused. ``allocator``: see :func:`allocator_env`
    (every worker of this job; vLLM's actors keep the system allocator).
    """
    if ray.is_initialized():
        return ray.get_runtime_context()
    os.environ.update(WORKER_ENV)
    # DeepSpeed JIT-builds ops into TORCH_EXTENSIONS_DIR (the learner skips the CPU shm op, but
    # other ops may still be built, e.g. by a user config). One cache
    # per environment: two venvs sharing ~/.cache/torch_extensions rebuild each other's ops,
    # and an actor killed mid-build leaves a lock that hangs every later build.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    env_vars = dict(WORKER_ENV)
    for key in ("TORCH_EXTENSIONS_DIR", "RAYKD_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
        if key in os.environ:
            env_vars[key] = os.environ[key]
    env_vars.update(allocator_env(allocator))
    runtime_env = {"env_vars": env_vars}
    if address is None and "RAY_ADDRESS" in os.environ:
        address = os.environ["RAY_ADDRESS"]
    if address:
        local = address.split("://")[-1].split(":")[0] in ("127.0.0.1", "localhost", "auto")
        if os.environ.get("RAYKD_LOOPBACK_NODE") and not local:
            raise RuntimeError(
                f"ray.address={address!r} is a remote cluster, but this process configured Ray "
                "for a loopback-only node (RAY_ADDRESS was unset when raykd was imported); "
                f"set RAY_ADDRESS={address} in the environment instead"
            )
        return ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    # The embedded node listens on 127.0.0.1 only (raykd/__init__.py set
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray was imported); its processes die with
    # this driver, however it exits (raykd/roles/reaper.py).
    start_reaper()
    return ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        num_gpus=num_gpus or 0,
        include_dashboard=False,
        runtime_env=runtime_env,
        log_to_driver=True,
        _node_ip_address="127.0.0.1",
        configure_logging=True,
        logging_level="WARNING",
    )


def start_reaper() -> subprocess.Popen | None:
    """Mark the environment of the node about to start with a token of this driver and start
    the watchdog that, once this driver is gone, kills every marked process and every process
    it saw descend from this driver (the node's, and any other child left running; see
    :mod:`raykd.roles.reaper`). Linux only (it reads ``/proc``); elsewhere nothing."""
    global _REAPER
    if not os.path.isdir("/proc/self"):
        return None
    token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    os.environ[TOKEN_VAR] = token
    script = os.path.join(os.path.dirname(__file__), "reaper.py")
    _REAPER = subprocess.Popen(
        [sys.executable, "-S", script, str(os.getpid()), token],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != TOKEN_VAR},  # never reaps itself
        start_new_session=True,
    )
    return _REAPER


_REAPER: subprocess.Popen | None = None  # kept: it runs as long as this driver


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
