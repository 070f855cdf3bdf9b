"""Caller side of the sandbox: probe, plan layers, start a run, judge its verdict.

Nothing here runs untrusted code; :mod:`raykd.sandbox._child` does, in a fresh interpreter.
The verdict is judged only from what the caller alone holds: a per-run token that the child's
harness writes on a private pipe after the tests return (never the exit code, never stdout),
the supervisor's wait status and deadline flag, the output file sizes and the cgroup's OOM
counter.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

from raykd.sandbox import _cgroup
from raykd.sandbox.verdict import (
    Limits,
    Verdict,
    _setup_layers,
    judge,
)

CHILD_DIR = os.path.dirname(os.path.abspath(__file__))
BOOT = f"import sys;sys.path.append({CHILD_DIR!r});import _child;_child.main(int(sys.argv[1]))"
LAYERS = ("namespaces", "seccomp", "landlock", "cgroup", "unprivileged_uid", "audit")
# finer names a config may require; each implies the layer it is part of
ALIASES = {
    "userns": "namespaces",
    "netns": "namespaces",
    "pidns": "namespaces",
    "mountns": "namespaces",
    "landlock_net": "landlock",
    "landlock_scope": "landlock",
}
WEAKNESS = {
    "namespaces": "no namespaces: the program shares the host network stack (only seccomp and "
    "Landlock stop connections), sees host pids, and its leftover processes are only killed "
    "by the supervisor's sweep and killpg",
    "seccomp": "no seccomp: process creation, exec, UDP/Unix sockets, ptrace, io_uring and "
    "other kernel interfaces are refused only by the in-process audit hooks, which native "
    "code bypasses",
    "landlock": "no Landlock: the program can read every file its uid can read (and, without "
    "the mount namespace, write wherever its uid may)",
    "unprivileged_uid": "the program keeps root's kernel uid (capabilities dropped): visible "
    "root-owned files are open to it as far as the other layers allow; RLIMIT_NPROC is ignored",
    "cgroup": "no cgroup: memory is bounded by RLIMIT_AS only (not the scratch tmpfs or page "
    "cache), the process count by seccomp/RLIMIT_NPROC only",
    "audit": "no audit hooks: the program can trace or scan the harness (sys.settrace, gc) "
    "and so fake a pass",
}
_NOBODY = 65534


class SandboxUnavailable(RuntimeError):
    """A required isolation layer does not work on this machine."""


# ---------------------------------------------------------------- probing

_probe_lock = threading.Lock()
_probes: dict = {}


def _child_probe(python: str) -> dict:
    scratch = tempfile.mkdtemp(prefix="raykd-sandbox-probe-")
    os.chmod(scratch, 0o777)
    r, w = os.pipe()
    try:
        cfg = json.dumps({"mode": "probe", "scratch": scratch}).encode()
        os.write(w, cfg)
        os.close(w)
        out = subprocess.run(
            [python, "-I", "-S", "-c", BOOT, str(r)],
            pass_fds=(r,),
            capture_output=True,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            timeout=60,
            cwd=scratch,
        )
        return json.loads(out.stdout)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return {"python": python, "errors": {"probe": f"{type(e).__name__}: {e}"}}
    finally:
        os.close(r)
        shutil.rmtree(scratch, ignore_errors=True)


def _candidates(python: str | None) -> list[str]:
    if python:
        return [python]
    out = []
    for p in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if p and os.path.exists(p) and os.path.realpath(p) not in map(os.path.realpath, out):
            out.append(p)
    return out


def _bwrap() -> str | None:
    for p in (shutil.which("bwrap"), os.path.join(os.path.dirname(sys.executable), "bwrap")):
        if p and os.access(p, os.X_OK):
            return p
    return None


def probe(python: str | None = None, refresh: bool = False) -> dict:
    """Which layers work here (cached per process): namespaces (and ``userns``, ``netns``,
    ``pidns``, ``mountns``), ``seccomp``, ``landlock`` (``landlock_abi``, ``landlock_net``,
    ``landlock_scope``), ``cgroup`` (``cgroup_version``), ``unprivileged_uid``, ``audit``,
    ``subreaper``, the interpreter used for runs, and ``errors`` (why a layer is missing).

    As root, the interpreter is the first of this one, ``/usr/bin/python3``... (same
    major.minor) whose files uid 65534 can read, so runs can drop root; else this one.
    """
    with _probe_lock:
        if python in _probes and not refresh:
            return dict(_probes[python])
        chosen = None
        for cand in _candidates(python):
            info = _child_probe(cand)
            if chosen is None:
                chosen = info
            elif (
                info.get("python_version", "").split(".")[:2]
                != chosen.get("python_version", "").split(".")[:2]
            ):
                continue
            if info.get("unprivileged_uid") or os.geteuid() != 0:
                chosen = info
                break
        info = dict(chosen or {})
        info.setdefault("errors", {})
        cg = _cgroup.version() if os.geteuid() == 0 or os.access(_cgroup.ROOT, os.W_OK) else None
        info["cgroup"] = cg is not None
        info["cgroup_version"] = cg
        if cg is None:
            info["errors"]["cgroup"] = "no writable cgroup hierarchy with memory and pids"
        info["bwrap"] = _bwrap()
        info["machine"] = os.uname().machine
        info["kernel"] = os.uname().release
        for layer in LAYERS:
            info[layer] = bool(info.get(layer))
        _probes[python] = info
        return dict(info)


# ---------------------------------------------------------------- the sandbox

_warned: set = set()


def _secure_dir(path: str, mode: int) -> None:
    os.makedirs(path, mode=mode, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise SandboxUnavailable(f"{path} is not a directory owned by uid {os.geteuid()}")
    os.chmod(path, mode)


def _rmtree(path: str) -> None:
    def fix(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)


_cleaned_bases: set = set()


def _clean_stale_rundirs(base: str) -> None:
    if base in _cleaned_bases:
        return
    _cleaned_bases.add(base)
    for name in os.listdir(base):
        owner = name.split("-")[0]
        if not owner.isdigit() or int(owner) == os.getpid():
            continue
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            _rmtree(os.path.join(base, name))
        except PermissionError:
            pass


class Sandbox:
    """A configured sandbox: ``Sandbox(require=["seccomp", "landlock"]).run(code, tests)``.

    ``layers="auto"`` uses every layer that works here (and warns once about what is not
    isolated); a list selects layers explicitly. ``require`` names layers (or the finer
    ``userns``/``netns``/``pidns``/``mountns``/``landlock_net``/``landlock_scope``) that must
    work, else :class:`SandboxUnavailable` names the missing one and why.
    """

    def __init__(self, require=(), layers="auto", limits: Limits | None = None,
                 python: str | None = None, workdir: str | None = None):  # fmt: skip
        self.limits = limits or Limits()
        self.info = probe(python)
        self.python = self.info.get("python") or sys.executable
        for name in [*require, *([] if layers == "auto" else layers)]:
            if name not in LAYERS and name not in ALIASES:
                raise ValueError(
                    f"unknown sandbox layer {name!r}; known: {LAYERS + tuple(ALIASES)}"
                )
        missing = [n for n in require if not self.info.get(n)]
        if missing:
            why = "; ".join(
                f"{n}: {self.info['errors'].get(ALIASES.get(n, n), 'not available')}"
                for n in missing
            )
            raise SandboxUnavailable(
                f"required sandbox layer(s) {', '.join(missing)} not available on this "
                f"machine ({why})"
            )
        if layers == "auto":
            plan = [n for n in LAYERS if self.info.get(n)]
        else:
            plan = list(dict.fromkeys(ALIASES.get(n, n) for n in layers))
            bad = [n for n in plan if not self.info.get(n)]
            if bad:
                raise SandboxUnavailable(f"sandbox layer(s) {', '.join(bad)} not available here")
        need = {ALIASES.get(n, n) for n in require}
        if not need <= set(plan):
            raise SandboxUnavailable(f"required layer(s) {sorted(need - set(plan))} not selected")
        self.layers = tuple(plan)
        self.missing = tuple(n for n in LAYERS if n not in plan)
        if layers == "auto" and self.missing and self.missing not in _warned:
            _warned.add(self.missing)
            warnings.warn("raykd.sandbox: " + self.describe(), RuntimeWarning, stacklevel=2)
        base = workdir or os.path.join(tempfile.gettempdir(), f"raykd-sandbox-{os.geteuid()}")
        self.base = os.path.abspath(base)
        _secure_dir(self.base, 0o711)
        _clean_stale_rundirs(self.base)
        if "cgroup" in self.layers:
            _cgroup.clean_stale()

    def describe(self) -> str:
        """The layers in use and, for each missing one, what is therefore not isolated."""
        text = f"layers: {', '.join(self.layers) or 'rlimits only'} (python {self.python})"
        for n in self.missing:
            text += f"; {WEAKNESS[n]}"
        return text

    def run(self, code: str, tests: str | None = None, *, stdin: str | bytes | None = None,
            expected_stdout: str | None = None, limits: Limits | None = None) -> Verdict:  # fmt: skip
        """Run ``code`` then ``tests`` (same namespace); see :mod:`raykd.sandbox`."""
        lim = limits or self.limits
        run_id = f"{os.getpid()}-{secrets.token_hex(6)}"
        rundir = os.path.join(self.base, run_id)
        t0 = time.monotonic()
        os.mkdir(rundir, 0o711)
        try:
            return self._run_in(rundir, run_id, code, tests, stdin, expected_stdout, lim, t0)
        finally:
            _rmtree(rundir)

    def run_many(self, items, max_workers: int | None = None, limits: Limits | None = None):
        """Run ``items`` — ``(code, tests)`` pairs, code strings, or dicts of :meth:`run`'s
        arguments — in parallel threads (one process tree each); verdicts in input order."""

        def one(item):
            if isinstance(item, str):
                return self.run(item, limits=limits)
            if isinstance(item, dict):
                return self.run(**{"limits": limits, **item})
            return self.run(*item, limits=limits)

        with ThreadPoolExecutor(max_workers or os.cpu_count() or 2) as pool:
            return list(pool.map(one, items))

    # -------------------------------------------------------------- one run

    def _run_in(self, rundir, run_id, code, tests, stdin, expected, lim: Limits, t0) -> Verdict:
        scratch = os.path.join(rundir, "scratch")
        os.mkdir(scratch, 0o700)
        drop = "unprivileged_uid" in self.layers and os.geteuid() == 0
        if drop:
            os.chown(scratch, _NOBODY, _NOBODY)
        token = secrets.token_hex(16)
        child_layers = [n for n in self.layers if n != "cgroup"]
        cfg = {
            "mode": "run", "code": code, "tests": tests, "token": token, "scratch": scratch,
            "layers": child_layers, "limits": lim.child(), "child_dir": CHILD_DIR,
            "caller_pid": os.getpid(),
        }  # fmt: skip
        group = None
        if "cgroup" in self.layers:
            pids = 8 + (256 if lim.threads else lim.processes)
            group = _cgroup.RunGroup(run_id, lim.memory + lim.scratch + (256 << 20), pids)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch,
               "LANG": "C.UTF-8"}  # fmt: skip
        if stdin is not None:
            with open(os.path.join(rundir, "stdin"), "wb") as f:
                f.write(stdin.encode() if isinstance(stdin, str) else stdin)
        cfg_r, cfg_w = os.pipe()
        status_r, status_w = os.pipe()
        report_r, report_w = os.pipe()
        cfg["status_fd"], cfg["report_fd"] = status_w, report_w
        out = open(os.path.join(rundir, "stdout"), "w+b")
        err = open(os.path.join(rundir, "stderr"), "w+b")
        stdin_f = open(os.path.join(rundir, "stdin"), "rb") if stdin is not None else None
        proc = None
        try:
            proc = subprocess.Popen(
                [self.python, "-I", "-S", "-c", BOOT, str(cfg_r), f"raykd-sandbox:{run_id}"],
                stdin=stdin_f if stdin_f else subprocess.DEVNULL, stdout=out, stderr=err,
                pass_fds=(cfg_r, status_w, report_w), env=env, cwd=rundir,
                start_new_session=True,
            )  # fmt: skip
            for fd in (cfg_r, status_w, report_w):
                os.close(fd)
            cfg_r = status_w = report_w = -1
            if group:
                group.add(proc.pid)  # before the config is sent: nothing has forked yet
            try:
                with os.fdopen(cfg_w, "wb") as f:
                    cfg_w = -1
                    f.write(json.dumps(cfg).encode())
            except BrokenPipeError:
                pass
            status_raw, report, backstop = _collect(proc.pid, status_r, report_r,
                                                    lim.timeout + 10.0)  # fmt: skip
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the supervisor is not reaped yet
            except OSError:
                pass
            oom = group.oom_killed() if group else False
            if group:
                group.remove()
                group = None
            proc.wait()
        finally:
            for fd in (cfg_r, cfg_w, status_w, report_w, status_r, report_r):
                if fd >= 0:
                    os.close(fd)
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.wait()
            if group:
                group.remove()
            if stdin_f:
                stdin_f.close()
        try:
            status = json.loads(status_raw) if status_raw.strip() else None
        except ValueError:
            status = None
        out_size, err_size = os.fstat(out.fileno()).st_size, os.fstat(err.fileno()).st_size
        stdout, stderr = _head(out, lim.keep), _tail(err, lim.keep)
        full_out = _head(out, lim.output) if expected is not None else ""
        out.close()
        err.close()
        verdict = judge(status, report, token, out_size, err_size, lim, oom, backstop,
                        expected, full_out, tests is not None)  # fmt: skip
        verdict.stdout, verdict.stderr = stdout, stderr
        verdict.seconds = time.monotonic() - t0
        layers = _setup_layers(report) or list(child_layers)
        if "cgroup" in self.layers:
            layers.append("cgroup")
        verdict.layers = tuple(layers)
        return verdict


def _collect(pid: int, status_r: int, report_r: int, limit: float):
    """Drain both pipes until the supervisor exits (not reaped) or ``limit`` s pass."""
    deadline = time.monotonic() + limit
    pidfd = os.pidfd_open(pid)
    bufs = {status_r: b"", report_r: b""}
    poller = select.poll()  # not select(): a busy caller may hold fds above 1024
    for fd in (pidfd, status_r, report_r):
        poller.register(fd, select.POLLIN)
    live = {status_r, report_r}
    backstop = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                backstop = True
                break
            events = dict(poller.poll(left * 1000))
            for fd in live & set(events):
                chunk = os.read(fd, 65536)
                if not chunk:
                    live.discard(fd)
                    poller.unregister(fd)
                elif len(bufs[fd]) < (1 << 20):
                    bufs[fd] += chunk
            if pidfd in events:
                break
    finally:
        os.close(pidfd)
    for fd in live:  # whatever is buffered; a stray holder of the write end must not block
        os.set_blocking(fd, False)
        try:
            while (chunk := os.read(fd, 65536)) and len(bufs[fd]) < (1 << 20):
                bufs[fd] += chunk
        except BlockingIOError:
            pass
    return bufs[status_r], bufs[report_r], backstop


def _head(f, n: int) -> str:
    f.seek(0)
    data = f.read(n * 4).decode("utf-8", errors="replace")
    return data[:n] + (f"\n…[truncated at {n} chars]" if len(data) > n else "")


def _tail(f, n: int) -> str:
    size = os.fstat(f.fileno()).st_size
    f.seek(max(0, size - n * 4))
    data = f.read().decode("utf-8", errors="replace")
    return (f"[truncated, last {n} chars]…\n" + data[-n:]) if len(data) > n else data


_default: dict = {}
_default_lock = threading.Lock()


def _sandbox(require, layers, python=None) -> Sandbox:
    key = (tuple(require), layers if isinstance(layers, str) else tuple(layers), python)
    with _default_lock:
        if key not in _default:
            _default[key] = Sandbox(require=require, layers=layers, python=python)
        return _default[key]


def run_program(code: str, tests: str | None = None, *, limits: Limits | None = None, require=(),
                layers="auto", stdin: str | bytes | None = None,
                expected_stdout: str | None = None) -> Verdict:  # fmt: skip
    """Run one program (then its tests) in a sandbox with every available layer."""
    return _sandbox(require, layers).run(code, tests, stdin=stdin,
                                         expected_stdout=expected_stdout, limits=limits)  # fmt: skip


def run_many(items, *, max_workers: int | None = None, limits: Limits | None = None, require=(),
             layers="auto") -> list[Verdict]:  # fmt: skip
    """:meth:`Sandbox.run_many` on the default sandbox."""
    return _sandbox(require, layers).run_many(items, max_workers=max_workers, limits=limits)
