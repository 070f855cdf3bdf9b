"""Sandbox for untrusted, model-written Python programs (execution rewards, pass@k).

A low layer: imports nothing from other raykd packages and not ray.

API
---
``run_program(code, tests=None, *, limits=None, require=(), layers="auto", stdin=None,
expected_stdout=None) -> Verdict``
    Run ``code``, then (if given) ``tests`` in the same namespace — HumanEval style:
    ``tests = problem["test"] + f"\\ncheck({entry_point})"``; the program is then module
    ``solution`` (its ``if __name__ == "__main__":`` block does not run). Without tests it
    runs as ``__main__`` and passes if it runs to completion; with ``expected_stdout`` its
    stdout must also match (trailing whitespace per line and trailing blank lines ignored).
``run_many(items, *, max_workers=None, limits=None, require=(), layers="auto")``
    ``items``: ``(code, tests)`` pairs, code strings, or dicts of ``run_program`` keywords;
    runs them in parallel threads (one process tree each); verdicts in input order.
``Sandbox(require=(), layers="auto", limits=None, python=None, workdir=None)``
    The same with a fixed configuration: ``.run(code, tests, *, stdin, expected_stdout,
    limits)``, ``.run_many(items, max_workers, limits)``, ``.layers``, ``.missing``,
    ``.describe()``. ``require`` (layer names, or ``userns``/``netns``/``pidns``/``mountns``/
    ``landlock_net``/``landlock_scope``) raises :class:`SandboxUnavailable` naming the missing
    layer and why; ``layers="auto"`` uses all that work and warns once about the rest.
``probe(python=None, refresh=False) -> dict``
    Which layers work here (cached per process), the interpreter runs use, and why the
    missing ones are missing.
``Limits(timeout=10.0, cpu=None, memory=1 GiB, output=1 MiB, scratch=64 MiB, files=64,
processes=1, threads=False, keep=8192)``
``Verdict``: ``status``, ``passed``, ``reason``, ``stdout`` (head), ``stderr`` (tail),
    ``seconds``, ``cpu_seconds``, ``layers``, ``exit_code``, ``signal``; ``.to_dict()``.
CLI: :func:`raykd.sandbox.cli.main` (``raykd sandbox run PROGRAM.py [--tests T.py] [--json]``).

Statuses
--------
``passed``  the harness saw the tests (or the program) return normally;
``failed``  an exception, a failed assertion, ``sys.exit``/``os._exit`` before the end, a
            refused operation, wrong stdout;
``timeout`` wall clock (``Limits.timeout``) or CPU time (``Limits.cpu``);
``crashed`` killed by a signal (SIGSEGV, SIGABRT, ...);
``limit``   memory (MemoryError, cgroup OOM kill) or output/file size;
``error``   the sandbox itself failed (setup) — not evidence about the program.
The verdict never comes from the exit code or stdout: the harness writes a random per-run
token on a pipe only the caller reads, and only after the tests returned; a program that
exits early, prints "passed", writes guesses on every fd, kills its parent or patches the
harness gets no token. The token lives only in an audit hook's closure, and that hook
writes it only when called from the harness's own frame.

Process tree and layers (each listed in ``Verdict.layers`` when applied)
--------------------------------------------------------------------------
caller → supervisor (fresh ``python -I -S``: no site, no user paths; an environment with
only PATH/HOME/TMPDIR/LANG; new session; subreaper; wall-clock deadline; kills and reaps
every descendant) → [namespace parent] → harness (its own session; cwd = fresh scratch dir;
rlimits CPU/AS/NOFILE/FSIZE/CORE/NPROC/MEMLOCK/MSGQUEUE; not dumpable; no capabilities) →
the program. The caller ``killpg``-s the supervisor's group before reaping it.

``unprivileged_uid``  as root, the supervisor drops to uid 65534 (picking an interpreter —
    this one or ``/usr/bin/python3`` of the same minor version — whose files that uid can
    read). A non-root caller's program keeps the caller's uid; the other layers keep it away
    from the caller. Without it the program keeps kernel uid 0 (no capabilities).
``namespaces``  user, network (no interfaces up), pid (the harness is pid 1: nothing
    outlives it), mount (all read-only; /tmp, /home, /root, /run, /proc, /dev replaced; the
    scratch dir a size-limited tmpfs), IPC, UTS, cgroup — see :mod:`._namespaces`.
``seccomp``  deny-list of process creation, exec, sockets, signals to others, ptrace,
    mount/namespaces, bpf, io_uring, … — see :mod:`._seccomp`.
``landlock``  read only system/interpreter paths, write only the scratch dir, no TCP, no
    signals out — see :mod:`._landlock`.
``cgroup``  per-run memory (incl. tmpfs) and pids ceilings, kill-all — see :mod:`._cgroup`.
``audit``  in-process audit hooks refusing ``sys.settrace``/``setprofile``, ``gc`` heap
    walks, ``ctypes``, new audit hooks, code objects, fork/exec/socket APIs.
Seccomp and Landlock need no privileges, so they work in containers that block namespaces.

Weak points
-----------
Tests are only as strong as their comparisons: a function returning an object whose
``__eq__`` is always true passes ``assert f(x) == y``; one that rebinds
``__builtins__[...]`` of its own globals during a test call can fool later asserts (the
``builtins`` module itself is not the tests' builtins). The audit hooks are Python-level: if
``audit`` is off, or native code is reachable (it is not with seccomp + audit), the heap can
be searched for the token. Without namespaces, parallel runs share uid 65534. The seccomp
filter is a deny-list. Each run starts an interpreter (~40 ms CPU).
"""

from raykd.sandbox.core import (
    LAYERS,
    Sandbox,
    SandboxUnavailable,
    probe,
    run_many,
    run_program,
)
from raykd.sandbox.verdict import (
    CRASHED,
    ERROR,
    FAILED,
    LIMIT,
    PASSED,
    TIMEOUT,
    Limits,
    Verdict,
    judge,
)

__all__ = [
    "CRASHED",
    "ERROR",
    "FAILED",
    "LAYERS",
    "LIMIT",
    "PASSED",
    "TIMEOUT",
    "Limits",
    "Sandbox",
    "SandboxUnavailable",
    "Verdict",
    "judge",
    "probe",
    "run_many",
    "run_program",
]
