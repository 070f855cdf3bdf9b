"""Limits, the Verdict, and :func:`judge`: the verdict from caller-held evidence only.

Evidence: the per-run token on the report pipe (written by the harness after the tests
returned; the program cannot produce it), the supervisor's status (wait status of the
harness, CPU time, whether it hit the wall-clock deadline), the sizes of the output files and
the cgroup's OOM counter. Records the program could forge (error lines on the report pipe)
only choose between non-passing statuses; the exit code only names the reason.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import asdict, dataclass, field

PASSED, FAILED, TIMEOUT, CRASHED, LIMIT, ERROR = (
    "passed", "failed", "timeout", "crashed", "limit", "error",
)  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """Per-run limits. ``output`` caps stdout, stderr and every file written (RLIMIT_FSIZE)."""

    timeout: float = 10.0  # wall-clock seconds
    cpu: float | None = None  # CPU seconds (RLIMIT_CPU); None: same as timeout
    memory: int = 1 << 30  # address space bytes (RLIMIT_AS); cgroup adds scratch + overhead
    output: int = 1 << 20  # bytes per output file
    scratch: int = 64 << 20  # scratch tmpfs size (with namespaces)
    files: int = 64  # open files (RLIMIT_NOFILE)
    processes: int = 1  # RLIMIT_NPROC (process creation is also refused by seccomp)
    threads: bool = False  # allow threads (clone with CLONE_THREAD)
    keep: int = 8192  # characters of stdout (head) and stderr (tail) kept in the Verdict

    def child(self) -> dict:
        d = asdict(self)
        d["cpu"] = float(self.cpu if self.cpu is not None else self.timeout)
        return d


@dataclass
class Verdict:
    """Outcome of one run. ``passed`` is True only for status ``"passed"``."""

    status: str  # passed | failed | timeout | crashed | limit | error (sandbox, not program)
    reason: str
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    cpu_seconds: float | None = None
    layers: tuple[str, ...] = ()
    exit_code: int | None = None
    signal: int | None = None
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        self.passed = self.status == PASSED

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


def _records(report: bytes) -> list[dict]:
    out = []
    for line in report.split(b"\n"):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def _setup_layers(report: bytes) -> list[str] | None:
    first = report.split(b"\n", 1)[0]  # written by the harness before any untrusted code
    try:
        obj = json.loads(first)
    except ValueError:
        return None
    return [str(x) for x in obj["layers"]] if isinstance(obj, dict) and "layers" in obj else None


def _normalize(text: str) -> list[str]:
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def judge(status, report: bytes, token: str, out_size: int, err_size: int, lim: Limits,
          oom: bool = False, backstop: bool = False, expected: str | None = None,
          stdout: str = "", has_tests: bool = True) -> Verdict:  # fmt: skip
    """The verdict from caller-held evidence only (see the module docstring)."""
    first = _records(report.split(b"\n", 1)[0])
    if status is None:
        if backstop:
            return Verdict(TIMEOUT, "the supervisor did not finish; run killed")
        return Verdict(ERROR, "the sandbox supervisor died without a report")
    setup_error = status.get("setup_error") or (first[0].get("setup_error") if first else None)
    if setup_error:
        return Verdict(ERROR, f"sandbox setup failed: {setup_error}")
    wstatus = status.get("wstatus")
    code = os.waitstatus_to_exitcode(wstatus) if wstatus is not None else None
    exit_code = code if code is not None and code >= 0 else None
    sig = -code if code is not None and code < 0 else None
    kw = {"exit_code": exit_code, "signal": sig, "cpu_seconds": status.get("cpu")}
    if out_size >= lim.output or err_size >= lim.output:
        which = "stdout" if out_size >= lim.output else "stderr"
        return Verdict(LIMIT, f"output limit: {which} reached {lim.output} bytes", **kw)
    if token.encode() in report:
        if expected is not None and _normalize(stdout) != _normalize(expected):
            return Verdict(FAILED, "ran to completion but stdout differs from the expected", **kw)
        return Verdict(PASSED, "tests passed" if has_tests else "ran to completion", **kw)
    if status.get("timeout") or backstop:
        return Verdict(TIMEOUT, f"wall-clock timeout ({lim.timeout:g} s)", **kw)
    records = [r for r in _records(report) if "kind" in r]
    rec = records[-1] if records else None
    cpu_limit = int(-(-lim.child()["cpu"] // 1))
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig
        cpu = status.get("cpu") or 0.0
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= cpu_limit - 0.05):
            return Verdict(TIMEOUT, f"CPU time limit ({cpu_limit} s)", **kw)
        if oom:
            return Verdict(LIMIT, "memory limit (cgroup OOM kill)", **kw)
        if sig == signal.SIGXFSZ:
            return Verdict(LIMIT, "file size limit", **kw)
        if sig == signal.SIGSYS:
            return Verdict(CRASHED, "killed by seccomp (SIGSYS: foreign syscall ABI)", **kw)
        return Verdict(CRASHED, f"killed by {name}", **kw)
    if rec and rec.get("kind") == "memory" or oom:
        return Verdict(LIMIT, "memory limit (MemoryError)", **kw)
    if rec and rec.get("kind") == "output":
        return Verdict(LIMIT, "file size limit (EFBIG)", **kw)
    during = (
        "during the tests"
        if any(r.get("stage") == "tests" for r in _records(report))
        else ("before the tests ran")
    )
    if rec and rec.get("kind") == "exit":
        return Verdict(FAILED, f"{rec.get('type')}({rec.get('message')}) {during}", **kw)
    if rec:
        stage = rec.get("stage", "program")
        msg = f": {rec['message']}" if rec.get("message") else ""
        return Verdict(FAILED, f"{stage}: {rec.get('type')}{msg}", **kw)
    return Verdict(FAILED, f"exited with code {exit_code} {during}, no pass reported", **kw)
