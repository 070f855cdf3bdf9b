"""A per-run cgroup (v2, or v1 ``memory`` + ``pids``), managed by the caller.

What it adds over rlimits: a memory ceiling that also counts the scratch tmpfs and page cache
and is enforced by the OOM killer (reported as a memory limit), a hard cap on processes and
threads of the whole run regardless of uids, and a reliable way for the caller to kill every
process of a run even if the supervisor died. It needs write access to the cgroup tree (root,
or a delegated v2 subtree); runs get no cgroup otherwise. It does not restrict files,
syscalls or the network.

Stale run groups (left by a caller that was killed) are removed the first time a process uses
the cgroup layer: their names start with the pid of the process that made them.
"""

from __future__ import annotations

import os
import signal
import threading
import time

ROOT = "/sys/fs/cgroup"
GROUP = "raykd-sandbox"
_cleaned = False
_lock = threading.Lock()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _own(controller: str) -> str:
    """This process's cgroup path in the hierarchy of ``controller`` ("" for v2)."""
    for line in _read("/proc/self/cgroup").splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(",") or (controller == "" and names == ""):
            return path.rstrip("/")
    return ""


def _v2_root() -> str | None:
    if not os.path.exists(f"{ROOT}/cgroup.controllers"):
        return None
    base = ROOT + _own("")
    if not {"memory", "pids"} <= set(_read(f"{base}/cgroup.controllers").split()):
        return None
    return base


def _v1_roots() -> tuple[str, str] | None:
    mem, pids = f"{ROOT}/memory", f"{ROOT}/pids"
    if os.path.exists(f"{mem}/memory.limit_in_bytes") and os.path.exists(f"{pids}/cgroup.procs"):
        return mem + _own("memory"), pids + _own("pids")
    return None


def version() -> str | None:
    """``"v2"``, ``"v1"`` or None, by whether a test group can be made and removed."""
    try:
        g = RunGroup(f"probe-{os.getpid()}-{time.monotonic_ns()}", 64 << 20, 8)
    except OSError:
        return None
    g.remove()
    return g.kind


class RunGroup:
    def __init__(self, name: str, memory: int, pids: int):
        v2, v1 = _v2_root(), _v1_roots()
        if v2:
            self.kind, self.dirs = "v2", [f"{v2}/{GROUP}/{name}"]
        elif v1:
            self.kind, self.dirs = "v1", [f"{r}/{GROUP}/{name}" for r in v1]
        else:
            raise OSError("no writable cgroup hierarchy with memory and pids controllers")
        made = []
        try:
            for d in self.dirs:
                for attempt in range(3):  # a finishing run may remove the shared parent
                    parent = os.path.dirname(d)
                    if not os.path.isdir(parent):
                        os.makedirs(parent, exist_ok=True)
                        if self.kind == "v2":
                            _write(f"{parent}/cgroup.subtree_control", "+memory +pids")
                    try:
                        os.mkdir(d)
                        break
                    except FileNotFoundError:
                        if attempt == 2:
                            raise
                made.append(d)
            if self.kind == "v2":
                d = self.dirs[0]
                _write(f"{d}/memory.max", str(memory))
                if os.path.exists(f"{d}/memory.swap.max"):
                    _write(f"{d}/memory.swap.max", "0")
                _write(f"{d}/pids.max", str(pids))
            else:
                mem, pid = self.dirs
                _write(f"{mem}/memory.limit_in_bytes", str(memory))
                if os.path.exists(f"{mem}/memory.memsw.limit_in_bytes"):
                    _write(f"{mem}/memory.memsw.limit_in_bytes", str(memory))
                _write(f"{pid}/pids.max", str(pids))
        except OSError:
            for d in reversed(made):
                _rmdir(d)
            raise

    def add(self, pid: int) -> None:
        for d in self.dirs:
            _write(f"{d}/cgroup.procs", str(pid))

    def oom_killed(self) -> bool:
        name = "memory.events" if self.kind == "v2" else "memory.oom_control"
        for line in _read(f"{self.dirs[0]}/{name}").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip() not in ("", "0"):
                return True
        return False

    def kill_all(self) -> None:
        if self.kind == "v2" and os.path.exists(f"{self.dirs[0]}/cgroup.kill"):
            try:
                _write(f"{self.dirs[0]}/cgroup.kill", "1")
            except OSError:
                pass
        for _ in range(200):
            pids = {int(p) for d in self.dirs for p in _read(f"{d}/cgroup.procs").split()}
            if not pids:
                return
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.005)

    def remove(self) -> None:
        self.kill_all()
        for d in self.dirs:
            _rmdir(d)
            try:  # the shared parent too, once empty: leave nothing in the caller's cgroup
                os.rmdir(os.path.dirname(d))
            except OSError:
                pass


def _rmdir(d: str) -> None:
    for _ in range(100):
        try:
            os.rmdir(d)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.005)


def clean_stale() -> None:
    """Remove run groups whose creating process is gone (once per process)."""
    global _cleaned
    with _lock:
        if _cleaned:
            return
        _cleaned = True
    bases = [f"{ROOT}/{GROUP}"] + [f"{r}/{GROUP}" for r in (_v1_roots() or ())]
    for base in bases:
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            owner = name.split("-")[1] if name.startswith("probe-") else name.split("-")[0]
            if not owner.isdigit():
                continue
            try:
                os.kill(int(owner), 0)
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            d = f"{base}/{name}"
            if os.path.isdir(d):
                for p in _read(f"{d}/cgroup.procs").split():
                    try:
                        os.kill(int(p), signal.SIGKILL)
                    except OSError:
                        pass
                _rmdir(d)
        try:
            os.rmdir(base)
        except OSError:
            pass
