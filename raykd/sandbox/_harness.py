"""The harness: the last trusted code in the sandboxed process, around the program.

Loaded as a top-level module by :mod:`_child` in the child interpreter (standard library and
the sibling layer modules only). :func:`harness` applies, in order: its own session, the
scratch dir as cwd, default signal dispositions, rlimits, not-dumpable, no capabilities,
Landlock, seccomp; it writes the setup line (layers applied) on the report pipe and then runs
the program and its tests with :func:`_run`, which is where the pass token is reported.
"""

from __future__ import annotations

import builtins
import ctypes
import json
import linecache
import os
import resource
import signal
import sys
import traceback
import types

import _landlock
import _namespaces
import _seccomp

NOBODY = 65534
REPORT_EVENT = "raykd.sandbox.report"
BLOCKED_EVENTS = frozenset(
    {
        "sys.settrace", "sys.setprofile", "sys._current_frames", "sys._current_exceptions",
        "sys.addaudithook", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "code.__new__", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
        "os.system", "os.startfile", "subprocess.Popen", "pty.spawn", "socket.__new__",
        "socket.connect", "socket.bind", "socket.getaddrinfo", "os.ptrace",
    }
)  # fmt: skip
SYSTEM_READ = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin"]
SYSTEM_FILES = [
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime", "/etc/passwd", "/etc/group",
    "/etc/nsswitch.conf", "/etc/mime.types", "/etc/os-release",
    "/dev/zero", "/dev/urandom", "/dev/random", "/dev/full",
]  # fmt: skip

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]  # fmt: skip
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36


def _prctl(option: int, arg: int) -> bool:
    return _libc.prctl(option, arg, 0, 0, 0) == 0


def _send(fd: int, obj: dict) -> None:
    try:
        os.write(fd, (json.dumps(obj) + "\n").encode())
    except OSError:
        pass


def _setup_failed(fd: int, exc: BaseException) -> None:
    _send(fd, {"setup_error": f"{type(exc).__name__}: {exc}"})
    try:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        pass


def _drop_to_nobody() -> None:
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


def _keep_paths() -> list[str]:
    """The interpreter's module directories (they must stay readable)."""
    return [p for p in sys.path if p and os.path.exists(p)]


def _close_fds(keep: set[int]) -> None:
    top = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 20)
    lo = 0
    for hi in [*sorted(keep), top]:
        if lo < hi:  # closerange(n, n) closes everything on some 3.11 builds
            os.closerange(lo, hi)
        lo = hi + 1


def _set_rlimits(lim: dict) -> None:
    cpu = max(1, int(-(-lim["cpu"] // 1)))
    nproc = lim["processes"] if not lim["threads"] else max(lim["processes"], 256)
    for res, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (lim["memory"], lim["memory"])),
        (resource.RLIMIT_NOFILE, (lim["files"], lim["files"])),
        (resource.RLIMIT_FSIZE, (lim["output"], lim["output"])),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_NPROC, (nproc, nproc)),
        (resource.RLIMIT_MEMLOCK, (0, 0)),
        (resource.RLIMIT_MSGQUEUE, (0, 0)),
    ):
        resource.setrlimit(res, value)


def harness(cfg: dict, in_ns: bool) -> None:
    report_fd, layers, lim = cfg["report_fd"], cfg["layers"], cfg["limits"]
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if not in_ns and os.getppid() != cfg["supervisor_pid"]:
        os._exit(1)
    _close_fds({0, 1, 2, report_fd})
    os.setsid()  # its own session and group: kill(0, ...) reaches nobody else
    os.chdir(cfg["scratch"])
    applied = ["rlimits", "new_session", "empty_env", "subreaper"]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    if in_ns:
        applied += ["userns", "netns", "pidns", "mountns"]
    _set_rlimits(lim)
    _prctl(PR_SET_DUMPABLE, 0)
    if cfg["kuid"] != 0:
        applied.append(f"uid={cfg['kuid']}")
    try:
        _namespaces.drop_capabilities()
        applied.append("no_capabilities")
    except OSError:
        if in_ns or os.geteuid() == 0:
            raise
    if "landlock" in layers:
        read = SYSTEM_READ + SYSTEM_FILES + _keep_paths()
        info = _landlock.restrict(read, [cfg["scratch"]], dev_write=["/dev/null"])
        applied.append(f"landlock(abi={info['abi']})")
    if "seccomp" in layers:
        _seccomp.install(os.getpid(), allow_threads=lim["threads"])
        applied.append("seccomp")
    if "audit" in layers:
        applied.append("audit")
    _send(report_fd, {"layers": applied})
    _run(cfg, report_fd, block="audit" in layers)


def _install_hooks(token: bytes, fd: int, frame, block: bool) -> None:
    """Audit hooks. The first writes the token, once, and only when ``sys.audit(REPORT_EVENT)``
    is called by the harness frame ``frame`` itself; it allocates nothing and calls no Python
    code on any other event, so no program code ever runs while its frame (with the token in
    its closure) is on the stack. The second refuses introspection and process/socket APIs."""
    getframe, write, done, name = sys._getframe, os.write, [False], REPORT_EVENT

    def report(event, args):  # everything it uses is in its closure, out of reach
        if event == name and not done[0]:
            if getframe(1) is frame:
                done[0] = True
                write(fd, token)

    sys.addaudithook(report)
    if not block:
        return
    blocked, denied = BLOCKED_EVENTS, PermissionError

    def refuse(event, args):
        if event in blocked or event.startswith("ctypes."):
            raise denied(f"sandbox: {event} is not allowed")

    sys.addaudithook(refuse)


def _describe(exc: BaseException) -> dict:
    kind = "error"
    if isinstance(exc, MemoryError):
        kind = "memory"
    elif isinstance(exc, OSError) and exc.errno == 27:  # EFBIG: RLIMIT_FSIZE
        kind = "output"
    elif isinstance(exc, SystemExit):
        kind = "exit"
    try:
        msg = str(exc)[:500]
    except BaseException:  # noqa: BLE001
        msg = "<unprintable>"
    return {"kind": kind, "type": type(exc).__name__[:100], "message": msg}


def _run(cfg: dict, report_fd: int, block: bool) -> None:
    """Program, then tests, in one fresh module namespace; report the token iff both
    returned normally. Everything the harness needs is bound before untrusted code runs."""
    code, tests = cfg.pop("code"), cfg.pop("tests")
    write, exit_, audit, compile_, exec_ = os.write, os._exit, sys.audit, compile, exec
    event = REPORT_EVENT
    out, err, dumps, print_exc = sys.stdout, sys.stderr, json.dumps, traceback.print_exception
    # a script runs as __main__; a program under tests is a module (its `if __name__ ==
    # "__main__":` block does not run, as with HumanEval's own harness)
    mod = types.ModuleType("__main__" if tests is None else "solution")
    ns = mod.__dict__
    bdict = dict(builtins.__dict__)  # private builtins: `builtins.x = ...` does not reach tests
    pristine = tuple(bdict.items())  # immutable: reachable through frames, not changeable
    ns["__builtins__"] = bdict
    sys.modules["__main__"] = sys.modules[mod.__name__] = mod
    for name, src in (("<program>", code), ("<tests>", tests or "")):
        linecache.cache[name] = (len(src), None, src.splitlines(True), name)
    for name in ("_child", "_harness", "_landlock", "_namespaces", "_seccomp"):
        sys.modules.pop(name, None)
    sys.path[:] = [p for p in sys.path if p != cfg["child_dir"]]

    is_a, no_memory = isinstance, MemoryError
    memory_records = {  # built now: after a MemoryError there may be no room to build them
        st: (dumps({"kind": "memory", "type": "MemoryError", "stage": st}) + "\n").encode()
        for st in ("compile", "program", "tests")
    }

    def fail(stage: str, exc: BaseException) -> None:
        if is_a(exc, no_memory):
            try:
                write(report_fd, memory_records[stage])
            except OSError:
                pass
            ns.clear()  # free what the program holds so that the traceback can be printed
        info = _describe(exc)
        info["stage"] = stage
        try:
            write(report_fd, (dumps(info) + "\n").encode())
        except BaseException:  # noqa: BLE001
            pass
        try:
            tb = exc.__traceback__  # skip the harness's own frame
            print_exc(type(exc), exc, tb.tb_next if tb and tb.tb_next else tb, file=err)
            err.flush()
        except BaseException:  # noqa: BLE001
            pass
        try:
            out.flush()
        except BaseException:  # noqa: BLE001
            pass
        exit_(1)

    _install_hooks(cfg.pop("token").encode(), report_fd, sys._getframe(), block)
    try:
        program = compile_(code, "<program>", "exec")
    except BaseException as e:  # noqa: BLE001
        fail("compile", e)
    try:
        exec_(program, ns)
    except BaseException as e:  # noqa: BLE001
        fail("program", e)
    if tests is not None:
        bdict.clear()
        bdict.update(pristine)
        ns["__builtins__"] = bdict
        try:
            write(report_fd, b'{"stage": "tests"}\n')
            suite = compile_(tests, "<tests>", "exec")
            exec_(suite, ns)
        except BaseException as e:  # noqa: BLE001
            fail("tests", e)
    audit(event)  # must be this frame itself: see _install_hooks
    for stream in (out, err):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    exit_(0)
