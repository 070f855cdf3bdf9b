"""Teacher scoring throughput and the size of its top-k target cache vs full logits.

The SmolLM2-135M-Instruct teacher (``--quick``: a tiny random one) scores ``--examples``
quickstart examples (docstring -> stdlib function, at most 256 tokens) in batches of
``--batch-size``, through one teacher scorer actor (2 threads) on a local Ray node:

* ``token_logprobs``: the log-prob of every given token (what reverse KL / MiniLLM rewards
  need), in tokens scored per second (every non-padding position);
* ``topk_targets``: the top-``k`` log-probs at every response position (forward-KL / JSD
  targets), tokens per second, and the same through :meth:`TopKCache.fill` (scoring + writing
  one file per example);
* the same forward in this process without Ray (``in_process``), for the actor's cost;
* **bytes per response token**: the cache on disk, the top-k pair in memory (``k`` float32
  values + ``k`` int32 indices) and the full float32 logits (``V x 4`` bytes) the cache spares.

Usage::

    python benchmarks/teacher_scoring.py            # full (~1 min on 2 cores)
    python benchmarks/teacher_scoring.py --quick    # tiny teacher

Results: ``benchmarks/results/teacher_scoring[_quick].json`` (``--out``) and a table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import bench_examples, bench_models, result_path, spread, table, write_result  # noqa: E402


def batches(examples, size: int, pad_id: int):
    from raykd.batch import examples_to_batch

    return [examples_to_batch(examples[i : i + size], pad_id)
            for i in range(0, len(examples), size)]  # fmt: skip


def timed(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--examples", type=int, default=None, help="default 32 (--quick: 8)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="default 3 (--quick: 1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n = args.examples or (8 if args.quick else 32)
    rounds = args.rounds or (1 if args.quick else 3)

    import torch

    from raykd.models import load_model
    from raykd.roles.group import RoleGroup
    from raykd.roles.runtime import init_ray
    from raykd.roles.target_cache import TopKCache
    from raykd.roles.teacher import HFTeacherScorer

    teacher = bench_models(args.quick)["teacher"]
    examples, pad_id = bench_examples(teacher, n, args.quick)
    parts = batches(examples, args.batch_size, pad_id)
    all_tokens = float(sum(b.attention_mask.sum() for b in parts))
    resp_tokens = float(sum(b.loss_mask.sum() for b in parts))
    k, t = args.top_k, args.threads
    init_ray(num_cpus=2)
    out: dict = {"benchmark": "teacher_scoring", "quick": args.quick, "teacher": teacher,
                 "examples": n, "batch_size": args.batch_size, "top_k": k, "threads": t,
                 "tokens": all_tokens, "response_tokens": resp_tokens}  # fmt: skip
    scorer = RoleGroup(HFTeacherScorer, 1, num_cpus=0.5, name="teacher",
                       make_args=lambda r: ((teacher, "float32", t), {}))  # fmt: skip
    with scorer, tempfile.TemporaryDirectory(prefix="raykd-bench-cache-") as cache_dir:
        scorer.map("token_logprobs", parts[:1])  # warm-up
        lp = timed(lambda: scorer.map("token_logprobs", parts), rounds)
        tk = timed(lambda: scorer.map("topk_targets", parts, k=k), rounds)
        cache = TopKCache(cache_dir, teacher, k, 1.0)
        t0 = time.perf_counter()
        cache.fill(examples, scorer, pad_id, args.batch_size)
        fill = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in Path(cache.dir).glob("*.pt"))
    model = load_model(teacher, dtype=torch.float32).eval()
    torch.set_num_threads(t)
    local = HFTeacherScorer.__new__(HFTeacherScorer)  # the scorer's code, in this process
    local.model, local.device = model, "cpu"
    local_lp = timed(lambda: [local.token_logprobs(b) for b in parts], rounds)
    vocab = model.config.vocab_size

    def rate(xs, tokens):
        return {"tokens_per_s": tokens / spread(xs)["median"], "seconds": spread(xs)}

    out["token_logprobs"] = rate(lp, all_tokens)
    out["topk_targets"] = rate(tk, all_tokens)
    out["in_process_token_logprobs"] = rate(local_lp, all_tokens)
    out["cache_fill"] = {"seconds": fill, "tokens_per_s": all_tokens / fill}
    out["bytes_per_response_token"] = {
        "topk_cache_on_disk": disk / resp_tokens,
        "topk_in_memory": k * (4 + 4),
        "full_logits_fp32": vocab * 4,
    }
    out["full_logits_vs_cache_on_disk"] = vocab * 4 / (disk / resp_tokens)
    path = write_result(result_path(args, "teacher_scoring"), out)
    rows = [{"what": w, "tps": out[key]["tokens_per_s"]} for w, key in (
        ("token_logprobs (actor)", "token_logprobs"), ("topk_targets (actor)", "topk_targets"),
        ("TopKCache.fill (actor + disk)", "cache_fill"),
        ("token_logprobs (in process)", "in_process_token_logprobs"))]  # fmt: skip
    print(table(rows, [("what", "teacher scoring", ""), ("tps", "tokens/s", ".0f")]))
    b = out["bytes_per_response_token"]
    print(f"bytes per response token: cache on disk {b['topk_cache_on_disk']:.0f}, top-{k} in "
          f"memory {b['topk_in_memory']}, full fp32 logits {b['full_logits_fp32']} "
          f"({out['full_logits_vs_cache_on_disk']:.0f}x the cache)")  # fmt: skip
    print(f"-> {path}")


if __name__ == "__main__":
    main()
