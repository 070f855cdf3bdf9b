"""The sandbox's child side: supervisor, namespace parent and the harness around the program.

Started by :mod:`raykd.sandbox.core` as ``python -I -S -c BOOT CFG_FD raykd-sandbox:RUN_ID``
with an empty-but-minimal environment, a new session, the run dir as cwd and the JSON config
on ``CFG_FD``. It imports only the standard library and its sibling layer modules (as
top-level modules), and never raykd.

Process tree of one run::

    caller ── S supervisor (subreaper, wall-clock deadline, reaps everything)
                └─ W namespace parent (only with namespaces: unshare, mounts; waits)
                     └─ H harness = pid 1 of the new pid namespace: rlimits, Landlock,
                        seccomp, audit hooks, then the program and its tests

S drops root to uid 65534 first when the interpreter's files are readable by that uid. H
reports on a pipe the caller alone reads: a setup line before any untrusted code, error lines,
and — only after the tests returned normally — the per-run token, written by an audit hook
that checks that it is called from the harness frame itself (the token is in no frame,
module or object the program can reach without the blocked introspection APIs). S reports
the wait status, CPU time and whether it hit the deadline on a second pipe.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
import time

import _landlock
import _namespaces
import _seccomp
from _harness import (
    NOBODY,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_PDEATHSIG,
    SYSTEM_READ,
    _drop_to_nobody,
    _keep_paths,
    _prctl,
    _send,
    _setup_failed,
    harness,
)

# ---------------------------------------------------------------- supervisor (S)


def main(cfg_fd: int) -> None:
    with os.fdopen(cfg_fd, "rb") as f:
        raw = f.read()
    cfg = json.loads(raw)
    del raw
    if cfg.get("mode") == "probe":
        _probe(cfg)
    _supervise(cfg)


def _wait_deadline(pid: int, deadline: float) -> bool:
    """Block until ``pid`` exits (True) or ``deadline`` passes (False); does not reap."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            left = deadline - time.monotonic()
            if pidfd is not None:
                if left <= 0:
                    return False
                if select.select([pidfd], [], [], left)[0]:
                    return True
                continue
            try:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    return True
            except ChildProcessError:
                return True
            if left <= 0:
                return False
            time.sleep(min(0.005, left))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _sweep() -> None:
    """Kill and reap every process left below the subreaper (orphans are reparented to us)."""
    me = os.getpid()
    for _ in range(1000):
        kids = []
        try:
            with open(f"/proc/{me}/task/{me}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            pass
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] != 0:
                pass
        except ChildProcessError:
            return
        if not kids:
            time.sleep(0.001)


def _supervise(cfg: dict) -> None:
    status_fd, report_fd = cfg["status_fd"], cfg["report_fd"]
    layers = cfg["layers"]
    status: dict = {"timeout": False}
    deadline = time.monotonic() + cfg["limits"]["timeout"]
    try:
        if "unprivileged_uid" in layers and os.geteuid() == 0:
            _drop_to_nobody()
        cfg["kuid"] = os.geteuid()
        # after the uid change, which clears the parent-death signal
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != cfg["caller_pid"]:
            os._exit(1)  # the caller is already gone
        use_ns = "namespaces" in layers
        cfg["supervisor_pid"] = os.getpid()
        if use_ns:
            pid, ns_r, err = _fork_into_namespaces(cfg["kuid"], lambda w: _ns_parent(cfg, w))
            if err:
                status["setup_error"] = err
        else:
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(status_fd)
                    harness(cfg, in_ns=False)
                except BaseException as e:  # noqa: BLE001 - report, never run the program
                    _setup_failed(report_fd, e)
                os._exit(70)
        os.close(report_fd)
        if not _wait_deadline(pid, deadline):
            status["timeout"] = True
            os.kill(pid, signal.SIGKILL)
        _, wstatus, ru = os.wait4(pid, 0)
        if use_ns:
            lines = b""
            while chunk := os.read(ns_r, 65536):
                lines += chunk
            info = {}
            for line in lines.splitlines():
                try:
                    info.update(json.loads(line))
                except ValueError:
                    pass
            status.update(info)
            if "wstatus" not in info and os.WIFSIGNALED(wstatus):
                status["wstatus"] = wstatus
        else:
            status.update(wstatus=wstatus, cpu=ru.ru_utime + ru.ru_stime, maxrss=ru.ru_maxrss)
    except Exception as e:  # noqa: BLE001
        status["setup_error"] = f"supervisor: {type(e).__name__}: {e}"
    _sweep()
    _send(status_fd, status)
    os._exit(0)


def _read_line(fd: int) -> bytes:
    line = b""
    while not line.endswith(b"\n") and (c := os.read(fd, 1)):
        line += c
    return line.strip()


def _fork_into_namespaces(kuid: int, body) -> tuple[int, int, str | None]:
    """Fork a child that enters new namespaces (see :mod:`_namespaces`), then runs
    ``body(pipe_w)`` and exits. The parent maps root's uid for it when ``kuid`` is 0 (only a
    process outside may). Returns (pid, read end of the child's pipe, setup error or None)."""
    ns_r, ns_w = os.pipe()
    go_r, go_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(ns_r)
        os.close(go_w)
        try:
            if kuid == 0:
                os.setgroups([])
            _namespaces.unshare()
            if kuid == 0:
                os.write(ns_w, b"unshared\n")
                if os.read(go_r, 1) != b"1":
                    raise OSError("the supervisor could not map root's uid")
            else:
                _namespaces.map_ids()
            os.close(go_r)
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)
            body(ns_w)
        except BaseException as e:  # noqa: BLE001
            _send(ns_w, {"setup_error": f"namespaces: {type(e).__name__}: {e}"})
        os._exit(71)
    os.close(ns_w)
    os.close(go_r)
    err = None
    if kuid == 0:
        line = _read_line(ns_r)
        if line == b"unshared":
            try:
                _namespaces.map_ids(str(pid), 0, 0)
                os.write(go_w, b"1")
            except OSError as e:
                err = f"namespaces: {e}"
        elif line:
            try:
                err = json.loads(line).get("setup_error") or line.decode()
            except ValueError:
                err = line.decode(errors="replace")
    os.close(go_w)
    return pid, ns_r, err


def _ns_parent(cfg: dict, ns_w: int) -> None:
    """W: finish the mount namespace, fork the harness as pid 1, relay its wait status."""
    os.close(cfg["status_fd"])
    _namespaces.setup_mounts(cfg["scratch"], _keep_paths(), cfg["limits"]["scratch"])
    pid = os.fork()  # pid 1 of the new pid namespace
    if pid == 0:
        try:
            os.close(ns_w)
            harness(cfg, in_ns=True)
        except BaseException as e:  # noqa: BLE001
            _setup_failed(cfg["report_fd"], e)
        os._exit(70)
    os.close(cfg["report_fd"])
    _, wstatus, ru = os.wait4(pid, 0)
    _send(ns_w, {"wstatus": wstatus, "cpu": ru.ru_utime + ru.ru_stime, "maxrss": ru.ru_maxrss})
    os._exit(0)


# ---------------------------------------------------------------- probe


def _probe_child(fn) -> tuple[bool, str]:
    """Run ``fn`` in a forked child; (worked, error message)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            fn()
            os.write(w, b"ok")
            os._exit(0)
        except BaseException as e:  # noqa: BLE001
            os.write(w, f"{type(e).__name__}: {e}".encode()[:500])
            os._exit(1)
    os.close(w)
    msg = b""
    while chunk := os.read(r, 4096):
        msg += chunk
    os.close(r)
    _, st = os.waitpid(pid, 0)
    ok = os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0 and msg == b"ok"
    return ok, "" if ok else (msg.decode(errors="replace") or f"wait status {st}")


def _probe(cfg: dict) -> None:
    scratch = cfg["scratch"]
    res: dict = {"python": sys.executable, "python_version": sys.version.split()[0]}
    err: dict = {}
    root = os.geteuid() == 0
    res["euid"] = os.geteuid()

    def nobody_reads():
        _drop_to_nobody()
        for p in _keep_paths():
            os.listdir(p) if os.path.isdir(p) else open(p, "rb").close()
        with open(os.__file__, "rb") as f:
            f.read(1)

    if root:
        ok, e = _probe_child(nobody_reads)
        res["unprivileged_uid"] = ok
        if not ok:
            err["unprivileged_uid"] = f"uid {NOBODY} cannot read the interpreter: {e}"
    else:
        res["unprivileged_uid"] = True
    drop = root and res["unprivileged_uid"]

    def ns_full():
        if drop:
            _drop_to_nobody()

        def body(w):
            _namespaces.setup_mounts(scratch + "/ns", _keep_paths(), 1 << 20)
            pid = os.fork()
            if pid == 0:
                os._exit(0 if os.getpid() == 1 and not os.path.exists("/proc/self") else 3)
            _send(w, {"pid1": os.waitpid(pid, 0)[1] == 0})
            os._exit(0)

        pid, r, err = _fork_into_namespaces(os.geteuid(), body)
        os.waitpid(pid, 0)
        lines = _read_line(r)
        if err or b'"pid1": true' not in lines:
            raise OSError(err or lines.decode(errors="replace") or "no answer")

    ok, e = _probe_child(ns_full)
    res["namespaces"] = ok
    for name, flag in (
        ("userns", _namespaces.CLONE_NEWUSER),
        ("netns", _namespaces.CLONE_NEWUSER | _namespaces.CLONE_NEWNET),
        ("pidns", _namespaces.CLONE_NEWUSER | _namespaces.CLONE_NEWPID),
        ("mountns", _namespaces.CLONE_NEWUSER | _namespaces.CLONE_NEWNS),
    ):
        res[name] = ok or _probe_child(lambda f=flag: _namespaces.unshare(f))[0]
    if not ok:
        err["namespaces"] = e
    res["landlock_abi"] = _landlock.abi_version()
    ok, e = _probe_child(lambda: _landlock.restrict(SYSTEM_READ + _keep_paths(), [scratch]))
    res["landlock"] = ok
    res["landlock_net"] = ok and res["landlock_abi"] >= 4
    res["landlock_scope"] = ok and res["landlock_abi"] >= 6
    if not ok:
        err["landlock"] = e

    def seccomp_works():
        _seccomp.install(os.getpid())
        try:
            os.fork()
        except PermissionError:
            return
        os._exit(9)  # in the (impossible) forked child and the parent alike: not working

    ok, e = _probe_child(seccomp_works)
    res["seccomp"] = ok
    if not ok:
        err["seccomp"] = e

    def subreaper():
        if not _prctl(PR_SET_CHILD_SUBREAPER, 1):
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")

    res["subreaper"] = _probe_child(subreaper)[0]
    res["audit"] = hasattr(sys, "addaudithook")
    res["errors"] = err
    sys.stdout.write(json.dumps(res))
    sys.stdout.flush()
    os._exit(0)
