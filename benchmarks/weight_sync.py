"""Weight sync from the learner to rollout workers, against a plain in-process copy.

**hf rollout workers** (always), with each strategy they take: ``shared_memory`` (the
default: one file on tmpfs the workers map) and ``object_store``; the first sync of each
(``shared_memory``: making and mapping the file) is reported apart. The benchmark student (the quickstart's 24-layer SmolLM2 student; ``--quick``: a tiny one) in a
DeepSpeed learner (one rank, ZeRO-0) synced ``--repeats`` times into ``--samplers`` hf
rollout workers on one local Ray node (2 CPUs), beside a **plain in-process copy** of the
same bytes into as many destinations (``copy_`` into preallocated tensors), the floor. Also
reported: the bytes a sync ships vs the model's unique storage (tied weights count once).

**vLLM engine** (when ``.venv-vllm`` exists and neither ``--quick`` nor ``--no-vllm``), on the
SmolLM2-135M teacher as before:

* **engine start**: building a ``rollout.backend=vllm`` sampler group (actor in .venv-vllm,
  in-process engine, ``enforce_eager``) until it answers;
* **weight sync** of the full model (fp32, tied ``lm_head`` sent once) from a DeepSpeed
  learner (one rank, ZeRO-0) into the engine, ``--repeats`` times per strategy:
  ``object_store`` (buckets through Ray's object store, ``collective_rpc`` into the
  in-process engine) and ``torch_group`` (gloo broadcast from learner rank 0; its first sync
  also builds the group, reported apart); each includes vLLM's layerwise reload and the
  prefix-cache reset; beside them a plain in-process copy of the same bytes;
* **greedy decoding** of ``--prompts`` quickstart prompts (stdlib docstring -> code) x
  ``--tokens`` new tokens by a vLLM sampler and an hf sampler (same threads), after one
  warm-up call each: response tokens per second of wall time (Ray call included); and whether
  the two agree (tokens identical, max |Δ log-prob| of the sampled tokens) on the synced
  weights.

Usage::

    python benchmarks/weight_sync.py                 # hf, then vLLM if .venv-vllm exists
    python benchmarks/weight_sync.py --quick         # tiny student, hf only (seconds)
    python benchmarks/weight_sync.py --repeats 5 --bucket-mb 16 --no-vllm

Results go to ``benchmarks/results/weight_sync[_quick].json`` (``--out``) and a table is
printed. Timings on a shared 2-core machine are noisy: the median of the repeats is reported
with the min and max.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
HF_STRATEGIES = ("shared_memory", "object_store")  # what the hf rollout workers take
SETUP = dict(zero_stage=0, lr=1e-5, weight_decay=0.0, betas=[0.9, 0.95], warmup_steps=0,
             micro_batch_size=2, grad_accum=1, grad_clip=1.0, seed=0)  # fmt: skip


def _spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _prompts(model: str, n: int) -> list[list[int]]:
    from raykd.data.tasks import load_task
    from raykd.models import load_tokenizer

    task = load_task("stdlib_code", load_tokenizer(model), num_train=n, num_eval=n)
    return [ex.prompt_ids for ex in task.eval[:n]]


def _decode(group, prompts, tokens) -> tuple[object, float]:
    group.call("generate", prompts[:1], max_new_tokens=4, greedy=True)  # warm-up
    t0 = time.perf_counter()
    rollout = group.call("generate", prompts, max_new_tokens=tokens, greedy=True)[0]
    seconds = time.perf_counter() - t0
    return rollout, float(rollout.batch.loss_mask.sum()) / seconds


def unique_bytes(named) -> int:
    """Bytes of the distinct storages behind ``(name, tensor)`` pairs (tied weights once)."""
    seen, total = set(), 0
    for _, t in named:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def _plain_copy(model: str, repeats: int, destinations: int = 1) -> list[float]:
    """Seconds to ``copy_`` the model's weights (a tied ``lm_head`` once) into
    ``destinations`` preallocated copies, in one process."""
    from raykd.models import load_model

    src = {k: v for k, v in load_model(model).state_dict().items() if k != "lm_head.weight"}
    dsts = [{k: torch.empty_like(v) for k, v in src.items()} for _ in range(destinations)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for dst in dsts:
            for k, v in src.items():
                dst[k].copy_(v)
        times.append(time.perf_counter() - t0)
    return times


def hf_sync(args) -> dict:
    """Learner -> ``args.samplers`` hf rollout workers (object store) vs a plain copy."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _bench import bench_models

    from raykd.config import load_config
    from raykd.models import load_model
    from raykd.roles.factory import learner_group, sampler_group
    from raykd.roles.weight_sync import make_strategy

    student = bench_models(args.quick)["student"]
    cfg = load_config(None, [
        f"rollout.num_workers={args.samplers}", "rollout.num_threads=1",
        "rollout.cpus_per_worker=0.5", f"learner.num_threads={args.threads}",
        "learner.cpus_per_rank=0.5", "learner.zero_stage=0",
        f"rollout.sync_bucket_mb={args.bucket_mb}",
    ])  # fmt: skip
    model = load_model(student)
    named = list(model.state_dict().items())
    out = {"model": student, "samplers": args.samplers,
           "state_dict_mb": sum(t.numel() * t.element_size() for _, t in named) / 2**20,
           "unique_storage_mb": unique_bytes(named) / 2**20}  # fmt: skip
    del model, named
    samplers = sampler_group(cfg, student)
    learners = learner_group(cfg, student, SETUP)
    try:
        shipped = learners.call_rank(0, "_sync_tensors")  # what every sync sends
        out["shipped_mb"] = sum(t.numel() * t.element_size() for _, t in shipped) / 2**20
        out["shipped_tensors"] = len(shipped)
        del shipped
        out["sync_seconds"], out["first_sync_seconds"] = {}, {}
        for name in HF_STRATEGIES:
            learners.weight_sync = make_strategy(name, args.bucket_mb)
            first = learners.sync_weights(samplers)  # shared_memory: makes and maps the file
            assert first.get("sync_fallback", 0.0) == 0.0, f"{name} fell back"
            out["first_sync_seconds"][name] = first["sync_seconds"]
            runs = [learners.sync_weights(samplers) for _ in range(args.repeats)]
            out["sync_seconds"][name] = _spread([r["sync_seconds"] for r in runs])
    finally:
        learners.shutdown()
        samplers.shutdown()
    out["plain_copy_seconds"] = _spread(_plain_copy(student, args.repeats, args.samplers))
    copy = out["plain_copy_seconds"]["median"]
    out["sync_vs_plain_copy"] = {k: v["median"] / copy for k, v in out["sync_seconds"].items()}
    return out


def vllm_sync(args) -> dict:
    """Learner -> a running vLLM engine (object store, torch group) and vLLM vs hf decoding."""
    from raykd.config import load_config
    from raykd.models import resolve_model
    from raykd.roles.factory import learner_group, sampler_group
    from raykd.roles.weight_sync import TorchGroupSync

    model = resolve_model(args.model)
    prompts = _prompts(model, args.prompts)

    def cfg(backend):
        return load_config(None, [
            f"teacher.model={model}", f"rollout.backend={backend}",
            f"rollout.num_threads={args.threads}", "rollout.cpus_per_worker=0.5",
            f"learner.num_threads={args.threads}", "learner.cpus_per_rank=0.5",
            "learner.zero_stage=0", f"rollout.sync_bucket_mb={args.bucket_mb}",
        ])  # fmt: skip

    out: dict = {"model": args.model, "bucket_mb": args.bucket_mb, "threads": args.threads}
    t0 = time.perf_counter()
    vllm = sampler_group(cfg("vllm"), model)
    vllm.call("torch_threads")
    out["engine_start_seconds"] = time.perf_counter() - t0
    hf = sampler_group(cfg("hf"), model)
    learners = learner_group(cfg("vllm"), model, SETUP)
    try:
        nbytes = sum(v.numel() * v.element_size() for k, v in
                     learners.call("state_dict")[0].items() if k != "lm_head.weight")  # fmt: skip
        out["sync_mb"] = nbytes / 2**20
        syncs: dict[str, list[float]] = {"object_store": [], "torch_group": []}
        for _ in range(args.repeats):
            syncs["object_store"].append(learners.sync_weights(vllm)["sync_seconds"])
        learners.weight_sync = TorchGroupSync(args.bucket_mb)
        first = learners.sync_weights(vllm)
        out["torch_group_connect_seconds"] = first["sync_connect_seconds"]
        out["torch_group_first_sync_seconds"] = first["sync_seconds"]
        for _ in range(args.repeats):
            syncs["torch_group"].append(learners.sync_weights(vllm)["sync_seconds"])
        out["sync_seconds"] = {k: _spread(v) for k, v in syncs.items()}
        out["sync_seconds"]["plain_copy"] = _spread(_plain_copy(model, args.repeats))

        got, vllm_tps = _decode(vllm, prompts, args.tokens)
        want, hf_tps = _decode(hf, prompts, args.tokens)
        mask = want.batch.loss_mask
        same = got.batch.input_ids.tolist() == want.batch.input_ids.tolist()
        out["decode"] = {
            "prompts": len(prompts), "new_tokens": args.tokens,
            "vllm_tokens_per_second": vllm_tps, "hf_tokens_per_second": hf_tps,
            "greedy_tokens_identical": same,
            "max_abs_logprob_delta": float(((got.logprobs - want.logprobs).abs() * mask).max())
            if same else None,
        }  # fmt: skip
    finally:
        learners.shutdown()
        hf.shutdown()
        vllm.shutdown()

    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny student, hf only")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="vLLM part's model")
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--repeats", type=int, default=None, help="default 5 (--quick: 2)")
    ap.add_argument("--samplers", type=int, default=2, help="hf rollout workers")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 5)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _bench import result_path, write_result

    from raykd.roles.runtime import init_ray
    from raykd.roles.vllm.engine import venv_problem

    init_ray(num_cpus=2)
    out: dict = {"benchmark": "weight_sync", "quick": args.quick, "bucket_mb": args.bucket_mb,
                 "repeats": args.repeats, "hf": hf_sync(args)}  # fmt: skip
    problem = "--quick" if args.quick else "--no-vllm" if args.no_vllm else venv_problem()
    if problem:
        out["vllm_skipped"] = problem
    else:
        out["vllm"] = vllm_sync(args)
    path = write_result(result_path(args, "weight_sync"), out)

    h = out["hf"]
    print(f"\nhf: {h['model']}: state_dict {h['state_dict_mb']:.0f} MiB, unique storage "
          f"{h['unique_storage_mb']:.0f} MiB, a sync ships {h['shipped_mb']:.0f} MiB "
          f"({h['shipped_tensors']} tensors) to {h['samplers']} rollout workers")  # fmt: skip
    print(f"{'weight sync':<28}{'median s':>10}{'min':>8}{'max':>8}{'first':>8}{'/copy':>8}")
    for name in HF_STRATEGIES:
        sp, ratio = h["sync_seconds"][name], h["sync_vs_plain_copy"][name]
        print(f"{name + ' (hf workers)':<28}{sp['median']:>10.3f}{sp['min']:>8.3f}"
              f"{sp['max']:>8.3f}{h['first_sync_seconds'][name]:>8.3f}{ratio:>7.2f}x")  # fmt: skip
    sp = h["plain_copy_seconds"]
    print(f"{'plain copy x' + str(h['samplers']):<28}{sp['median']:>10.3f}{sp['min']:>8.3f}"
          f"{sp['max']:>8.3f}")  # fmt: skip
    if "vllm" not in out:
        print(f"vLLM part skipped: {out['vllm_skipped']}")
        print(f"-> {path}")
        return
    v = out["vllm"]
    s, d = v["sync_seconds"], v["decode"]
    print(f"\nvLLM: {args.model}: {v['sync_mb']:.0f} MiB fp32, buckets of {args.bucket_mb:g} MiB")
    print(f"engine start (vLLM sampler group ready): {v['engine_start_seconds']:.1f} s")
    print(f"{'weight sync':<28}{'median s':>10}{'min':>8}{'max':>8}")
    for name in ("object_store", "torch_group", "plain_copy"):
        print(f"{name:<28}{s[name]['median']:>10.2f}{s[name]['min']:>8.2f}{s[name]['max']:>8.2f}")
    print(f"torch_group: group built in {v['torch_group_connect_seconds']:.2f} s (first sync "
          f"{v['torch_group_first_sync_seconds']:.2f} s)")  # fmt: skip
    print(f"greedy {d['prompts']}x{d['new_tokens']}: vLLM {d['vllm_tokens_per_second']:.1f} tok/s, "
          f"hf {d['hf_tokens_per_second']:.1f} tok/s; tokens identical: "
          f"{d['greedy_tokens_identical']}, max |Δ log-prob| {d['max_abs_logprob_delta']}")  # fmt: skip
    print(f"-> {path}")


if __name__ == "__main__":
    main()
