"""The embedded node's watchdog: when the driver that started a local Ray node dies, however
it dies (SIGKILL included), every process of that node dies too.

Ray ties its GCS and raylet to the driver, but their children (the dashboard and runtime-env
agents, idle workers) can outlive a SIGKILLed driver. :func:`raykd.roles.runtime.init_ray`
starts this script before the node, in a session of its own (a Ctrl-C in the terminal does
not reach it), as ``python reaper.py DRIVER_PID TOKEN``. While the driver lives it notes, twice
a second, every descendant of the driver (``(pid, start time)``: a pid reused later is not
mistaken for it); the node's processes also carry ``RAYKD_NODE_TOKEN=TOKEN`` in their
environment (the raylet's agents do not: Ray starts them with an environment of its own).
Once its parent is gone it SIGKILLs every noted descendant still alive and every process
carrying the token, then exits; after a clean ``ray.shutdown`` it finds nothing left. It
imports neither Ray nor raykd and runs as a file, so it needs no package on its path.
"""

from __future__ import annotations

import os
import signal
import sys
import time

TOKEN_VAR = "RAYKD_NODE_TOKEN"


def marked(token: str, skip: set[int]) -> list[int]:
    """Pids of the live processes whose environment has ``RAYKD_NODE_TOKEN=token``."""
    needle = f"{TOKEN_VAR}={token}".encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if needle in env:
            out.append(int(name))
    return out


def _stat(pid: int) -> tuple[int, int] | None:
    """``(parent pid, start time)`` of ``pid`` from ``/proc/<pid>/stat``, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int, skip: set[int]) -> dict[int, int]:
    """``pid -> start time`` of every live descendant of ``root`` (not those in ``skip``)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append((int(name), st[1]))
    out, todo = {}, [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            if pid not in skip and pid not in out:
                out[pid] = start
                todo.append(pid)
    return out


def reap(token: str, known: dict[int, int] | None = None, rounds: int = 5) -> int:
    """SIGKILL the marked processes and the ``known`` ones (pid -> start time) that still run
    (a few rounds: a dying raylet may still fork); how many signals were sent."""
    killed = 0
    for _ in range(rounds):
        pids = set(marked(token, {os.getpid()}))
        for pid, start in (known or {}).items():
            st = _stat(pid)
            if st is not None and st[1] == start:
                pids.add(pid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        time.sleep(0.2)
    return killed


def main(argv: list[str]) -> int:
    driver, token = int(argv[1]), argv[2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    me = os.getpid()
    known: dict[int, int] = {}
    while os.getppid() == driver:
        known.update(descendants(driver, {me}))
        time.sleep(0.5)
    reap(token, known)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
