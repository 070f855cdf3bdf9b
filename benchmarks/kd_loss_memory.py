"""Peak memory and time of forward+backward of word-KD forward-KL losses on CPU.

Cases (all compute the token-mean forward KL ``KL(p_T ‖ q_S)`` over the masked positions of
student logits ``[B, T, V]``, a float32 leaf that requires grad):

* ``naive``          log_softmax of both full ``[B, T, V]`` tensors, elementwise KL, sum;
* ``raykd_chunked``  :func:`raykd.losses.forward_kl` (fused, position-chunked) from full
  teacher logits;
* ``raykd_topk``     :func:`raykd.losses.topk_forward_kl` from cached top-k targets (the full
  teacher logits never exist in this process);
* ``trl_jsd``        TRL's ``GKDTrainer.generalized_jsd_loss`` with ``beta=0`` (forward KL).

Method: every case runs in a fresh subprocess. After the inputs are allocated and one warm-up
forward+backward has run (its gradient freed), the kernel's peak-RSS counter is reset by writing
``5`` to ``/proc/self/clear_refs``; the measured forward+backward then runs and the reported
*extra peak* is ``VmHWM − VmRSS_before``. It therefore includes the logits' ``.grad``
(``B·T·V·4`` bytes, needed by every case) and allocator overhead, and excludes the inputs
themselves. Workers run with ``MALLOC_MMAP_THRESHOLD_=1MiB``, so every tensor of 1 MiB or more
is ``mmap``-ed and returned to the OS when freed, and RSS tracks live tensors closely. Where ``clear_refs`` is unavailable, ``ru_maxrss`` is used instead (the
method is recorded in the results).

Usage::

    python benchmarks/kd_loss_memory.py            # full grid: V ∈ {49152, 151936}, T ∈ {512, 1024}
    python benchmarks/kd_loss_memory.py --quick    # small config, seconds

Results go to ``benchmarks/results/kd_loss_memory.json`` (``--out``) and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CASES = ("naive", "raykd_chunked", "raykd_topk", "trl_jsd")
# Extra float32 [B, T, V] copies each case needs on top of its inputs (measured on the quick
# config, rounded up) -- used only to skip cases that would not fit in --max-gb.
EXTRA_COPIES = {"naive": 5.5, "raykd_chunked": 1.5, "raykd_topk": 1.5, "trl_jsd": 7.5}
INPUT_COPIES = {"naive": 2, "raykd_chunked": 2, "raykd_topk": 1, "trl_jsd": 2}
GIB = 1024**3
DEFAULT_CHUNK_SIZE = 128  # raykd.losses.DEFAULT_CHUNK_SIZE (not imported: keeps --help fast)


# ------------------------------------------------------------------------------- worker side
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sequence(b: int, seq: int, vocab: int, seed: int) -> tuple[Any, Any]:
    """Student and teacher logits ``[T, V]`` of sequence ``b`` (deterministic).

    The teacher is peaked, like an LLM's next-token distribution: N(0, 2²) noise with 32 random
    tokens per position raised by 14 (top-64 keeps most, but not all, of the mass).
    """
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + b)
    student = 2.0 * torch.randn(seq, vocab, generator=g)
    teacher = 2.0 * torch.randn(seq, vocab, generator=g)
    boosted = torch.randint(0, vocab, (seq, 32), generator=g)
    teacher.scatter_add_(-1, boosted, torch.full((seq, 32), 14.0))
    return student, teacher


def _mask(batch: int, seq: int) -> Any:
    """Prompt (first 10%) and right padding (last 15% of odd sequences) are not targets."""
    import torch

    mask = torch.ones(batch, seq)
    mask[:, : seq // 10] = 0
    mask[1::2, seq - seq * 15 // 100 :] = 0
    return mask


def _make_inputs(case: str, batch: int, seq: int, vocab: int, k: int, seed: int):
    """Deterministic inputs, generated row by row so no temporary exceeds one sequence."""
    import torch

    student = torch.empty(batch, seq, vocab)
    teacher = None if case == "raykd_topk" else torch.empty(batch, seq, vocab)
    topk = (torch.empty(batch, seq, k), torch.empty(batch, seq, k, dtype=torch.long))
    topk_mass = 0.0
    for b in range(batch):
        student[b], row = _sequence(b, seq, vocab, seed)
        if teacher is not None:
            teacher[b] = row
        values, indices = torch.log_softmax(row, dim=-1).topk(k, dim=-1)
        topk_mass += values.exp().sum(-1).mean().item() / batch
        if case == "raykd_topk":
            topk[0][b], topk[1][b] = values, indices
        del row, values, indices
    student.requires_grad_(True)
    return student, teacher, topk, _mask(batch, seq), topk_mass


def _float64_check(fn, student, teacher, topk, mask, args) -> tuple[float, float]:
    """The case's value on sequence 0 (float32, on the training path: logits require grad)
    and the exact forward KL of that sequence in float64 (from regenerated teacher logits)."""
    import torch

    from raykd.losses import forward_kl, reduce_loss

    sub_teacher = None if teacher is None else teacher[:1]
    sub_topk = (topk[0][:1], topk[1][:1])
    sub_student = student[:1].detach().clone().requires_grad_(True)
    value = fn(sub_student, sub_teacher, sub_topk, mask[:1]).item()
    with torch.no_grad():
        s64, t64 = (x.double().unsqueeze(0) for x in _sequence(0, args.seq, args.vocab, args.seed))
        exact = reduce_loss(forward_kl(s64, t64, mask[:1], chunk_size=64), mask[:1]).item()
    return value, exact


def _loss_fn(case: str, chunk_size: int):
    import torch

    if case == "naive":

        def naive(student, teacher, topk, mask):
            log_q = torch.log_softmax(student, dim=-1)
            log_p = torch.log_softmax(teacher, dim=-1)
            per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
            return (per_token * mask).sum() / mask.sum()

        return naive
    if case == "raykd_chunked":
        from raykd.losses import forward_kl, reduce_loss

        def chunked(student, teacher, topk, mask):
            return reduce_loss(forward_kl(student, teacher, mask, chunk_size=chunk_size), mask)

        return chunked
    if case == "raykd_topk":
        from raykd.losses import reduce_loss, topk_forward_kl

        def topk_kd(student, teacher, topk, mask):
            per_token = topk_forward_kl(student, topk[0], topk[1], mask, chunk_size=chunk_size)
            return reduce_loss(per_token, mask)

        return topk_kd
    if case == "trl_jsd":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        def trl(student, teacher, topk, mask):
            labels = torch.where(mask.bool(), 0, -100)
            return GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=0.0)

        return trl
    raise ValueError(case)


def run_worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    fn = _loss_fn(args.case, args.chunk_size)
    student, teacher, topk, mask, topk_mass = _make_inputs(
        args.case, args.batch, args.seq, args.vocab, args.topk, args.seed
    )
    # Warm-up (first-call overheads, lazy imports), then free its gradient.
    fn(student, teacher, topk, mask).backward()
    student.grad = None

    rss_before = _status_kib("VmRSS")
    method = "VmHWM after clear_refs"
    if not _reset_peak():
        method = "ru_maxrss (peak since process start; upper bound)"
    start = time.perf_counter()
    loss = fn(student, teacher, topk, mask)
    forward_s = time.perf_counter() - start
    loss.backward()
    total_s = time.perf_counter() - start
    if method.startswith("VmHWM"):
        peak_kib = _status_kib("VmHWM")
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grad_norm = student.grad.norm().item()
    student.grad = None
    value_seq0, exact_seq0 = _float64_check(fn, student, teacher, topk, mask, args)
    result = {
        "case": args.case,
        "vocab": args.vocab,
        "seq": args.seq,
        "batch": args.batch,
        "topk": args.topk,
        "value": loss.item(),
        "grad_norm": grad_norm,
        "teacher_topk_mass": topk_mass,
        "seq0_value": value_seq0,
        "seq0_float64_exact": exact_seq0,
        "extra_peak_bytes": (peak_kib - rss_before) * 1024,
        "rss_before_bytes": rss_before * 1024,
        "forward_s": forward_s,
        "fwd_bwd_s": total_s,
        "memory_method": method,
    }
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------- driver side
def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _estimate_bytes(case: str, batch: int, seq: int, vocab: int) -> float:
    copy = batch * seq * vocab * 4
    return (INPUT_COPIES[case] + EXTRA_COPIES[case]) * copy + 0.5 * GIB


def run_case(args: argparse.Namespace, case: str, vocab: int, seq: int) -> dict:
    need = _estimate_bytes(case, args.batch, seq, vocab)
    budget = min(args.max_gb * GIB, _mem_available() - GIB)
    base = {"case": case, "vocab": vocab, "seq": seq, "batch": args.batch}
    if need > budget:
        reason = (
            f"skipped: needs ~{need / GIB:.1f} GiB (estimated) > budget {budget / GIB:.1f} GiB "
            f"(--max-gb {args.max_gb}, MemAvailable − 1 GiB)"
        )
        return {**base, "skipped": reason}
    cmd = [
        sys.executable, __file__, "--worker", "--case", case, "--vocab", str(vocab),
        "--seq", str(seq), "--batch", str(args.batch), "--topk", str(args.topk),
        "--chunk-size", str(args.chunk_size), "--threads", str(args.threads),
        "--seed", str(args.seed),
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        # glibc: mmap every allocation >= 1 MiB (and unmap it on free) instead of its dynamic
        # threshold (up to 32 MiB), so freed tensors leave RSS and the peak is of live memory.
        "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {**base, "skipped": f"failed (rc={proc.returncode}): {' | '.join(tail)}"}


def _fmt_table(results: list[dict]) -> str:
    header = (
        f"{'V':>7} {'T':>5} {'case':<14} {'extra peak':>11} {'×logits':>7} {'vs naive':>9} "
        f"{'fwd+bwd':>8} {'value':>10} {'|Δ value|':>10} {'seq0 |err|':>10}"
    )
    lines = [header, "-" * len(header)]
    naive = {(r["vocab"], r["seq"]): r for r in results if r["case"] == "naive" and "value" in r}
    for r in results:
        key = f"{r['vocab']:>7} {r['seq']:>5} {r['case']:<14}"
        if "skipped" in r:
            lines.append(f"{key} {r['skipped']}")
            continue
        ref = naive.get((r["vocab"], r["seq"]))
        ratio = f"{r['extra_peak_bytes'] / ref['extra_peak_bytes']:>8.1%}" if ref else f"{'n/a':>8}"
        diff = f"{abs(r['value'] - ref['value']):>10.2e}" if ref else f"{'n/a':>10}"
        err = abs(r["seq0_value"] - r["seq0_float64_exact"])
        copies = r["extra_peak_bytes"] / (r["batch"] * r["seq"] * r["vocab"] * 4)
        lines.append(
            f"{key} {r['extra_peak_bytes'] / GIB:>7.2f} GiB {copies:>7.2f} {ratio} "
            f"{r['fwd_bwd_s']:>7.2f}s "
            f"{r['value']:>10.5f} {diff} {err:>10.2e}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="V=8192, T=256 only")
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-gb", type=float, default=16.0, help="skip cases estimated above")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "kd_loss_memory.json"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.vocab, args.seq = args.vocab[0], args.seq[0]
        run_worker(args)
        return
    if args.quick:
        args.vocab, args.seq = [8192], [256]

    results = []
    for vocab in args.vocab:
        for seq in args.seq:
            for case in args.cases:
                result = run_case(args, case, vocab, seq)
                results.append(result)
                status = result.get("skipped") or f"{result['extra_peak_bytes'] / GIB:.2f} GiB"
                print(f"  V={vocab} T={seq} {case}: {status}", file=sys.stderr, flush=True)

    import torch

    meta = {
        "method": (
            "fresh subprocess per case (MALLOC_MMAP_THRESHOLD_=1MiB); extra peak = VmHWM "
            "(reset via /proc/self/clear_refs after inputs + one warm-up step) - VmRSS before "
            "the measured forward+backward; includes the logits' .grad, excludes the inputs"
        ),
        "batch": args.batch,
        "topk": args.topk,
        "chunk_size": args.chunk_size,
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(_fmt_table(results))
    print(
        f"\nmethod: {meta['method']}\n"
        "×logits: extra peak / size of the float32 logits; vs naive: extra peak relative to "
        "the naive case; |Δ value|: |loss − naive loss|; "
        "seq0 |err|: |loss on sequence 0 − float64 exact forward KL| (top-k: includes the "
        f"tail-bucket approximation)\nwritten to {args.out}"
    )


if __name__ == "__main__":
    main()
