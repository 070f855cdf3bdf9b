"""Execution reward: run the tests of each problem on the code of each completion.

``execution_reward(examples, completions, *, mode="fraction", ...)`` is a batch reward
(:mod:`raykd.rewards.registry`, name ``execution``). For a completion ``y`` of a problem with
tests ``t_1 .. t_N`` (``example.meta["tests"]``, format in :mod:`raykd.evaluate.execution`)::

    fraction:        R(x, y) = (1/N) sum_i 1[code(y) passes t_i]
    all_or_nothing:  R(x, y) = 1[code(y) passes t_1 .. t_N]

where ``code(y)`` is the ``<answer>`` block's (or the text's) first Python fenced block,
preceded by the problem's ``setup``. A completion without code, or whose program does not
parse, gets 0 without a run; so does a problem without tests (but a batch in which no problem
has tests is an error: the task has no tests, and every reward would be a silent 0).

Every test run is a sandboxed process tree (:mod:`raykd.sandbox`) judged by the parent from
outputs the program cannot forge; the runs of a batch go in parallel, ``workers`` at a time
(threads, one process tree each; default ``min(runs, CPUs of this process)``). In GRPO the
reward runs in the driver or, with ``grpo.reward_tasks > 0``, as that many Ray tasks with
``grpo.reward_cpus_per_task`` CPUs each, so the programs do not compete with the learners for
their cores. ``require`` names sandbox layers that must work where the reward runs (else
:class:`raykd.sandbox.SandboxUnavailable` says which and why); GRPO fills it from
``grpo.sandbox_require``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from raykd.evaluate.execution import run_tests
from raykd.sandbox import Limits, Sandbox

MODES = ("fraction", "all_or_nothing")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def execution_reward(
    examples: Sequence,
    completions: Sequence[str],
    *,
    mode: str = "fraction",
    timeout: float = 5.0,
    memory_mb: int = 512,
    workers: int | None = None,
    require: Sequence[str] = (),
    layers: str | Sequence[str] = "auto",
) -> list[float]:
    """Per completion, the share of its problem's tests its code passes (``mode="fraction"``)
    or 1.0 if it passes all of them, else 0.0 (``"all_or_nothing"``); ``timeout`` is the wall
    clock (and CPU) limit of one run in seconds, ``memory_mb`` its address-space limit."""
    if mode not in MODES:
        raise ValueError(f"execution reward: mode must be one of {list(MODES)}, got {mode!r}")
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError(f"execution reward: timeout and memory_mb must be > 0 ({timeout}, "
                         f"{memory_mb})")  # fmt: skip
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples for {len(completions)} completions")
    if not completions:
        return []
    if not any((getattr(ex, "meta", None) or {}).get("tests") for ex in examples):
        raise ValueError(
            "execution reward: no example in the batch has meta['tests'] (use a task with "
            "tests: function_tasks, humaneval, codeforces)"
        )
    sandbox = Sandbox(require=list(require), layers=layers if layers == "auto" else list(layers))
    limits = Limits(timeout=float(timeout), memory=int(memory_mb) << 20)
    outcomes = run_tests(
        examples,
        completions,
        per_test=mode == "fraction",
        sandbox=sandbox,
        limits=limits,
        workers=workers or _cpus(),
    )
    if mode == "fraction":
        return [o.fraction for o in outcomes]
    return [1.0 if o.all_passed else 0.0 for o in outcomes]
