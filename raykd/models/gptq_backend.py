"""Importing GPTQModel lazily and without side effects on the process environment.

Importing ``gptqmodel`` prints a banner and sets environment variables for the whole
process (``PYTORCH_ALLOC_CONF``, ``CUDA_DEVICE_ORDER``, and -- through its ``tokenicer``
dependency -- ``HF_HOME``/``HF_HUB_CACHE`` pointing into ``/tmp``). raykd imports it only
inside the functions that need it and puts every variable it changed back, except
``GPTQMODEL_CPU_WORKERS``, which GPTQModel reads at import: on CPU it must be set (to the
number of cores the process may use), or its worker pool fails on small machines.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

__all__ = ["cpu_workers", "import_gptqmodel"]

_CPU_WORKERS = "GPTQMODEL_CPU_WORKERS"


def cpu_workers() -> int:
    """The cores this process may use (its CPU affinity), at least 2: GPTQModel's model
    loader asks its CPU pool for 2 workers and refuses a smaller pool. (torch's thread count
    is not used: an earlier caller may have lowered it to 1.)"""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        available = os.cpu_count() or 1
    return max(2, available)


def import_gptqmodel(workers: int | None = None) -> ModuleType:
    """Import and return ``gptqmodel`` (set ``GPTQMODEL_CPU_WORKERS`` first; restore the rest).

    ``workers`` defaults to :func:`cpu_workers`; an existing ``GPTQMODEL_CPU_WORKERS`` wins.
    Once imported (by raykd or by transformers loading a GPTQ checkpoint), later calls
    return the module as is: the worker count is fixed at the first import.
    """
    if "gptqmodel" in sys.modules:
        return sys.modules["gptqmodel"]
    os.environ.setdefault(_CPU_WORKERS, str(workers or cpu_workers()))
    before = dict(os.environ)
    try:
        import gptqmodel
    except ImportError as err:
        raise ImportError(
            "GPTQ quantization needs the 'quant' extra: pip install 'raykd[quant]' "
            "(gptqmodel==7.6.0 optimum==2.3.0)"
        ) from err
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        for key, value in before.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
    return gptqmodel
