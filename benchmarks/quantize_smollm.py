"""Quantize SmolLM2-135M-Instruct to 4 bits (GPTQ and RTN) and compare it with float32 on CPU.

Model: the offline teacher (``raykd.models.resolve_model("smollm2-135m-instruct")``, float32
safetensors). Calibration: the chat-formatted prompt + reference texts of 64 training examples
of the ``stdlib_code`` task. Evaluation: held-out examples of the same task (other modules).

For each group size (default 32 and 64) both methods quantize every decoder-layer Linear to
4-bit asymmetric codes (format ``gptq_v2``; embeddings and norms in bfloat16). Then every model
(float32 and the quantized ones) is measured in a fresh process (spawned, so memory and load
time are not skewed by earlier models): load time, peak RSS growth during the load, greedy
generation speed (batch 1, ``--new-tokens`` tokens per prompt) and the generated ids. In the
parent: greedy agreement with float32 (identical continuations, and the matched prefix),
next-token ``KL(p_fp32 || p_q)`` and top-1 agreement on the held-out texts, and the relative
weight error of the quantized layers.

Usage::

    python benchmarks/quantize_smollm.py           # ~10 min on 2 idle cores, ~4 min when
                                                   # the quantized models are up to date
    python benchmarks/quantize_smollm.py --force   # re-quantize
    python benchmarks/quantize_smollm.py --group-sizes 64 --prompts 4

Results go to ``benchmarks/results/quantize_smollm.json`` (``--out``); a table is printed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "quantize_smollm.json"


def _measure_in_fresh_process(directory: str, prompts: list[list[int]], new_tokens: int) -> dict:
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    from raykd.quantize import measure

    return measure(directory, prompts, max_new_tokens=new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--group-sizes", default="32,64")
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--kl-texts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--work", default="~/.cache/raykd/bench_quantize")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--force", action="store_true", help="re-quantize even if up to date")
    args = parser.parse_args()

    import torch

    from raykd.data import load_task
    from raykd.models import load_model, load_tokenizer, resolve_model
    from raykd.quantize import (
        greedy_agreement,
        load_quantized,
        output_error,
        quantize,
        weight_error,
    )

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    task = load_task(
        "stdlib_code", tokenizer, max_length=512, num_train=args.calibration, num_eval=64, seed=0
    )
    calibration = [
        tokenizer.decode(e.prompt_ids + e.response_ids, skip_special_tokens=False)
        for e in task.train
    ]
    prompts = [e.prompt_ids for e in task.eval[: args.prompts]]
    kl_texts = [e.prompt_ids + e.response_ids for e in task.eval[: args.kl_texts]]
    work = Path(args.work).expanduser()

    quantized: dict[str, dict] = {}
    for group_size in [int(g) for g in args.group_sizes.split(",")]:
        for method in ("gptq", "rtn"):
            name = f"{method}-4bit-g{group_size}"
            start = time.perf_counter()
            summary = quantize(
                source, work / name, method=method, bits=4, group_size=group_size,
                calibration=calibration, force=args.force,
            )  # fmt: skip
            summary["wall_seconds"] = time.perf_counter() - start
            quantized[name] = summary
            reused = " (reused)" if summary["skipped"] else ""
            print(f"{name}: quantized in {summary['seconds']:.1f} s{reused}", flush=True)

    load_before = os.getloadavg()
    context = multiprocessing.get_context("spawn")
    measured: dict[str, dict] = {}
    for name, directory in [("fp32", source)] + [(n, s["out_dir"]) for n, s in quantized.items()]:
        with ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) as pool:
            measured[name] = pool.submit(
                _measure_in_fresh_process, directory, prompts, args.new_tokens
            ).result()
        print(f"{name}: {measured[name]['tokens_per_second']:.1f} tokens/s", flush=True)

    reference = load_model(source, dtype="float32")
    rows = []
    for name, result in measured.items():
        row = {
            "model": name,
            "size_mb": result["size_mb"],
            "size_vs_fp32": result["size_mb"] / measured["fp32"]["size_mb"],
            "params": result["params"],
            "load_seconds": result["load_seconds"],
            "load_peak_rss_mb": result["load_peak_rss_mb"],
            "load_rss_mb": result["load_rss_mb"],
            "peak_rss_mb": result["peak_rss_mb"],
            "first_call_seconds": result["first_call_seconds"],
            "tokens_per_second": result["tokens_per_second"],
            "tokens_per_cpu_second": result["tokens_per_cpu_second"],
            "new_tokens": result["new_tokens"],
            "greedy_vs_fp32": greedy_agreement(measured["fp32"]["outputs"], result["outputs"]),
            "sample": result["texts"][0],
        }
        if name in quantized:
            summary = quantized[name]
            model = load_quantized(summary["out_dir"])
            row["heldout_error"] = output_error(reference, model, kl_texts, tokenizer)
            del model
            row["weight_rel_error"] = weight_error(reference, summary["out_dir"])["relative"]
            row["quantize_seconds"] = summary["seconds"]
            row["bits_per_quantized_weight"] = summary["bits_per_quantized_weight"]
            row["overhead_mb"] = summary["overhead_bytes"] / 2**20
            row["calibration_used"] = summary["calibration_used"]
            row["calibration_tokens"] = summary["calibration_tokens"]
        rows.append(row)

    import gptqmodel  # already imported by the runs above; only its version is read
    import transformers

    report = {
        "model": args.model,
        "source": source,
        "task": "stdlib_code",
        "calibration_texts": len(calibration),
        "prompts": len(prompts),
        "kl_texts": len(kl_texts),
        "new_tokens_per_prompt": args.new_tokens,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15_before_measuring": load_before,
        "loadavg_1_5_15_after_measuring": os.getloadavg(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gptqmodel": gptqmodel.__version__,
        },
        "quantize_summaries": quantized,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    _print_table(rows)
    print(
        f"\nload average (1, 5, 15 min) before/after measuring: {load_before} / {os.getloadavg()}"
    )
    print(f"written to {out}")


def _print_table(rows: list[dict]) -> None:
    header = (
        f"{'model':<16}{'MiB':>8}{'vs fp32':>9}{'params':>12}{'quant s':>9}{'load s':>8}"
        f"{'load MiB':>10}{'RSS MiB':>9}{'tok/s':>8}{'tok/cpu-s':>10}{'greedy=':>9}{'prefix':>8}{'KL':>9}{'top1':>7}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        err = r.get("heldout_error", {})
        quant_s = f"{r['quantize_seconds']:.0f}" if "quantize_seconds" in r else "-"
        kl = f"{err['kl']:.4f}" if err else "-"
        top1 = f"{err['top1_agreement']:.3f}" if err else "-"
        print(
            f"{r['model']:<16}{r['size_mb']:>8.1f}{r['size_vs_fp32']:>8.1%} {r['params']:>12,}"
            f"{quant_s:>9}{r['load_seconds']:>8.2f}{r['load_peak_rss_mb']:>10.0f}{r['peak_rss_mb']:>9.0f}"
            f"{r['tokens_per_second']:>8.1f}{r['tokens_per_cpu_second']:>10.1f}{r['greedy_vs_fp32']['exact']:>9.2f}"
            f"{r['greedy_vs_fp32']['prefix']:>8.2f}{kl:>9}{top1:>7}"
        )


if __name__ == "__main__":
    main()
