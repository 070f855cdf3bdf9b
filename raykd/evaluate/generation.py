"""Evaluate a model: decode the eval split through rollout workers, then score it.

Greedy decoding gives the headline numbers; each seed in ``eval.sample_seeds`` adds a sampled
decode (temperature ``eval.temperature``) whose scores are reported as mean and spread.
"""

from __future__ import annotations

import statistics
import time

from raykd.batch import Example
from raykd.evaluate.metrics import evaluate_predictions


def decode(
    rollouts,
    examples: list[Example],
    *,
    max_new_tokens: int,
    batch_size: int,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Decode every example's prompt; batches are sorted by prompt length and spread
    round-robin over the rollout workers (all queued at once); texts come back in the
    original order. Batch ``b`` is seeded ``seed + b``."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    calls = [
        (([examples[i].prompt_ids for i in rows],), {"seed": seed + b_idx})
        for b_idx, rows in enumerate(batches)
    ]
    outputs = rollouts.map_calls(
        "generate_texts",
        calls,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
    )
    texts: list[str | None] = [None] * len(examples)
    for rows, batch_texts in zip(batches, outputs):
        for i, text in zip(rows, batch_texts):
            texts[i] = text
    return [t or "" for t in texts]


def evaluate_model(rollouts, examples: list[Example], kind: str, eval_cfg, label: str) -> dict:
    """Greedy (+ seeded sampled) decodes of ``examples`` scored against their references."""
    t0 = time.time()
    refs = [ex.reference for ex in examples]
    names = [ex.meta.get("name") for ex in examples]
    preds = decode(
        rollouts, examples, max_new_tokens=eval_cfg.max_new_tokens, batch_size=eval_cfg.batch_size
    )
    result = evaluate_predictions(preds, refs, names, kind)
    sampled = []
    for seed in eval_cfg.sample_seeds:
        s_preds = decode(
            rollouts,
            examples,
            max_new_tokens=eval_cfg.max_new_tokens,
            batch_size=eval_cfg.batch_size,
            greedy=False,
            temperature=eval_cfg.temperature,
            seed=seed,
        )
        sampled.append(evaluate_predictions(s_preds, refs, names, kind))
    if sampled:
        for key in ("rouge_l", "parse_rate"):
            vals = [s[key] for s in sampled if s.get(key) is not None]
            if vals:
                result[f"sampled_{key}_mean"] = statistics.fmean(vals)
                result[f"sampled_{key}_std"] = statistics.pstdev(vals)
    result["samples"] = [
        {"prompt": ex.prompt_text, "prediction": p, "reference": ex.reference}
        for ex, p in list(zip(examples, preds))[: eval_cfg.num_report_samples]
    ]
    result["predictions"] = preds
    result["seconds"] = round(time.time() - t0, 1)
    shown = f"rouge_l={result['rouge_l']:.1f}"
    if result.get("parse_rate") is not None:
        shown += f" parse_rate={result['parse_rate']:.0f}%"
    print(f"[eval {label}] {shown} on {len(examples)} examples ({result['seconds']}s)", flush=True)
    return result
