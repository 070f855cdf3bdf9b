"""Shared plumbing of the benchmarks that compare raykd with its peers (not a benchmark).

* **Models**: the full benchmarks use the built-in SmolLM2-135M-Instruct teacher and the
  quickstart's 24-layer student (the contiguous 6-layer block of least angular change
  dropped), derived once and cached under ``~/.cache/raykd/bench``; ``--quick`` uses a tiny
  random 4-layer Llama teacher and a 2-layer student built in seconds (same code paths).
* **Cases in subprocesses**: each measured case runs in a fresh Python process
  (``python <script> --worker <case> --result <file> ...``) so that one case's allocator,
  threads or Ray node never leak into the next. The parent samples the memory of the
  child's whole process tree (Ray's raylet, GCS and actor processes included: each case
  starts its own Ray node unless ``RAY_ADDRESS`` names one to join) every 0.25 s
  from the kernel's counters (:class:`TreeMemory`): private memory of every process, plus
  shared memory (Ray's object store) and shared libraries counted once.
* **Results**: JSON under ``benchmarks/results/`` with the machine, the versions and the
  command, and a plain-text table on stdout.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
GIB = 1024**3
TEACHER = "smollm2-135m-instruct"
STUDENT_LAYERS = 24


# ---- machine and versions ----------------------------------------------------------------
def machine() -> dict[str, Any]:
    import importlib.metadata as md

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / GIB, 1)
    except ImportError:
        pass
    versions = {}
    for pkg in ("torch", "transformers", "ray", "deepspeed", "trl", "accelerate"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": mem,
        "python": platform.python_version(),
        "versions": versions,
    }


def spread(xs: list[float]) -> dict[str, float]:
    """Median, mean, min, max and count of a list of measurements."""
    if not xs:
        return {"median": float("nan"), "mean": float("nan"), "min": float("nan"),
                "max": float("nan"), "n": 0}  # fmt: skip
    return {
        "median": statistics.median(xs),
        "mean": statistics.fmean(xs),
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
    }


# ---- models and prompts ------------------------------------------------------------------
def cache_root(quick: bool) -> Path:
    base = Path(os.environ.get("RAYKD_BENCH_CACHE", Path.home() / ".cache" / "raykd" / "bench"))
    return base / ("quick" if quick else "full")


def bench_models(quick: bool) -> dict[str, str]:
    """``{"teacher": dir, "student": dir}``: the models both raykd and the peer load."""
    import torch

    from raykd.models import (
        build_tiny_model,
        build_tiny_tokenizer,
        load_model,
        load_tokenizer,
        resolve_model,
        save_model,
        student_from_teacher,
    )

    root = cache_root(quick)
    student_dir = root / ("student-2" if quick else f"student-{STUDENT_LAYERS}")
    if quick:
        teacher_dir = root / "teacher-tiny"
        if not (teacher_dir / "config.json").exists():
            tok = build_tiny_tokenizer()
            model = build_tiny_model(tok, seed=0, num_layers=4, hidden_size=64)
            save_model(model, tok, teacher_dir)
        teacher = str(teacher_dir)
    else:
        teacher = resolve_model(TEACHER)
    if not (student_dir / "config.json").exists():
        tok = load_tokenizer(teacher)
        model = load_model(teacher, dtype=torch.float32)
        rule, keep = ("every_other", 2) if quick else ("angular", STUDENT_LAYERS)
        student = student_from_teacher(model, tok, rule=rule, keep=keep, teacher_name=teacher)
        save_model(student, tok, student_dir)
    return {"teacher": teacher, "student": str(student_dir)}


def bench_examples(teacher: str, n: int, quick: bool, seed: int = 0):
    """``n`` training examples of the quickstart task (docstring -> stdlib function)."""
    from raykd.data.tasks import load_task
    from raykd.models import load_tokenizer

    tok = load_tokenizer(teacher)
    # the tiny tokenizer is byte-level: the same texts are ~4x as many tokens
    task = load_task("stdlib_code", tok, max_length=1024 if quick else 256, num_train=n,
                     num_eval=1, seed=seed)  # fmt: skip
    if len(task.train) < n:
        raise SystemExit(f"only {len(task.train)} training examples, {n} needed")
    return task.train, tok.pad_token_id


# ---- cases in subprocesses, memory of the process tree -------------------------------------
def _status_kib(pid: int) -> dict[str, int]:
    """``RssAnon``, ``RssFile``, ``RssShmem`` (KiB) of ``/proc/<pid>/status``: counters the
    kernel keeps, so reading them never walks (or locks) the process's memory map."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


class TreeMemory:
    """Samples the memory of a process and all its descendants, from ``/proc/<pid>/status``
    counters (cheap; reading ``smaps`` instead stalls a process that allocates a lot).

    ``peak``: the peak of ``sum(RssAnon) + max(RssShmem) + max(RssFile)`` over the tree:
    private memory of every process, Ray's shared-memory object store once, shared libraries
    about once. ``peak_rss``: the peak of the plain sum of RSS (counts shared pages in every
    process that maps them)."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid, self.interval = pid, interval
        self.peak = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> tuple[int, int]:
        import psutil

        try:
            root = psutil.Process(self.pid)
            pids = [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return 0, 0
        stats = [st for st in map(_status_kib, pids) if st]
        if not stats:
            return 0, 0
        anon = sum(st.get("RssAnon", 0) for st in stats)
        shmem = max(st.get("RssShmem", 0) for st in stats)
        files = max(st.get("RssFile", 0) for st in stats)
        rss = sum(sum(st.values()) for st in stats)
        return (anon + shmem + files) * 1024, rss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            est, rss = self._sample()
            self.peak, self.peak_rss = max(self.peak, est), max(self.peak_rss, rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_case(script: str, case: str, extra: list[str], timeout: float = 3600) -> dict:
    """Run ``script --worker case --result F *extra`` in a fresh process; its JSON result plus
    ``peak_memory_gib`` (summed PSS of its process tree) and ``wall_seconds``."""
    with tempfile.TemporaryDirectory(prefix="raykd-bench-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, script, "--worker", case, "--result", str(result), *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # RAY_ADDRESS, if set, is joined
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=str(REPO))
        with TreeMemory(proc.pid) as mem:
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        if code != 0 or not result.exists():
            raise SystemExit(f"benchmark case {case!r} failed (exit {code}): {' '.join(cmd)}")
        out = json.loads(result.read_text())
    out["peak_memory_gib"] = mem.peak / GIB
    out["peak_summed_rss_gib"] = mem.peak_rss / GIB
    out["memory_method"] = ("peak over the case's process tree of sum(RssAnon) + max(RssShmem) "
                            "+ max(RssFile), sampled every 0.25 s")  # fmt: skip
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def result_path(args, benchmark: str) -> Path:
    """``--out`` if given, else ``benchmarks/results/<benchmark>[_quick].json``."""
    if args.out:
        return Path(args.out)
    return RESULTS / f"{benchmark}{'_quick' if args.quick else ''}.json"


def print_report(table_text: str, figures: dict, out: Path, fmt: str = "{}") -> None:
    """What every script prints at the end: its table, a ``name: value`` line per summary
    figure (formatted by ``fmt``), then where its JSON went."""
    print(table_text)
    for k, v in figures.items():
        print(f"{k}: {fmt.format(v)}")
    print(f"-> {out}")


def commit() -> str | None:
    """The repository's short HEAD, ``+dirty`` when tracked files differ from it; None
    outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, check=True, timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, text=True, capture_output=True, timeout=10).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty.strip() else "")


def write_result(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit(), **data}  # fmt: skip
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    return path


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table: ``columns`` are ``(key, header, format)``."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            line.append("-" if v is None else (format(v, fmt) if fmt else str(v)))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for n, line in enumerate(cells):
        first = line[0].ljust(widths[0])
        out.append("  ".join([first, *(c.rjust(w) for c, w in zip(line[1:], widths[1:]))]))
        if n == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)
