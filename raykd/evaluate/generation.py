"""Evaluate a model: decode the eval split through rollout workers, then score it.

Greedy decoding gives the headline numbers; each seed in ``eval.sample_seeds`` adds a sampled
decode (temperature ``eval.temperature``) whose scores are reported as mean and spread. Code
tasks whose examples carry tests (``meta["tests"]``) are also scored by running them in the
sandbox (:func:`raykd.evaluate.execution.execution_metrics`): ``pass_at_1`` (greedy, with its
standard error), ``sampled_pass_at_k`` for each ``k`` of ``eval.pass_k`` over the sampled
decodes, ``format_rate`` and ``reasoning_words``.
"""

from __future__ import annotations

import statistics
import time

from raykd.batch import Example
from raykd.evaluate.baselines import stub_answers
from raykd.evaluate.execution import execution_metrics
from raykd.evaluate.metrics import evaluate_predictions
from raykd.sandbox import Limits


def decode(
    rollouts,
    examples: list[Example],
    *,
    max_new_tokens: int,
    batch_size: int,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
) -> tuple[list[str], list[bool]]:
    """Decode every example's prompt: the response texts, and per text whether it ended on a
    stop token (not at ``max_new_tokens``). Batches are sorted by prompt length and spread
    round-robin over the rollout workers (all queued at once); texts come back in the
    original order. Batch ``b`` is seeded ``seed + b``."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    calls = [
        (([examples[i].prompt_ids for i in rows],), {"seed": seed + b_idx})
        for b_idx, rows in enumerate(batches)
    ]
    outputs = rollouts.map_calls(
        "generate_answers",
        calls,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
    )
    texts, stopped = [""] * len(examples), [False] * len(examples)
    for rows, answers in zip(batches, outputs):
        for i, (text, stop) in zip(rows, answers):
            texts[i], stopped[i] = text or "", bool(stop)
    return texts, stopped


def evaluate_model(rollouts, examples: list[Example], kind: str, eval_cfg, label: str) -> dict:
    """Greedy (+ seeded sampled) decodes of ``examples`` scored against their references."""
    t0 = time.time()
    preds, stopped = decode(
        rollouts, examples, max_new_tokens=eval_cfg.max_new_tokens, batch_size=eval_cfg.batch_size
    )
    sampled_preds = [
        decode(
            rollouts,
            examples,
            max_new_tokens=eval_cfg.max_new_tokens,
            batch_size=eval_cfg.batch_size,
            greedy=False,
            temperature=eval_cfg.temperature,
            seed=seed,
        )[0]
        for seed in eval_cfg.sample_seeds
    ]
    return score_answers(examples, preds, stopped, sampled_preds, kind, eval_cfg, label, t0)


def evaluate_stub(examples: list[Example], kind: str, eval_cfg, label: str = "stub") -> dict:
    """The no-model floor of a code task (:mod:`raykd.evaluate.baselines`): each answer is
    the requested signature with a ``pass`` body, scored like a model's greedy answers."""
    preds = stub_answers(examples)
    return score_answers(examples, preds, [True] * len(preds), [], kind, eval_cfg, label)


def score_answers(
    examples: list[Example],
    preds: list[str],
    stopped: list[bool],
    sampled_preds: list[list[str]],
    kind: str,
    eval_cfg,
    label: str,
    t0: float | None = None,
) -> dict:
    """Scores of greedy answers ``preds`` (and of each list of ``sampled_preds``): Rouge-L,
    parse and clean-stop rates, and for tasks with tests the execution metrics."""
    t0 = time.time() if t0 is None else t0
    refs = [ex.reference for ex in examples]
    names = [ex.meta.get("name") for ex in examples]
    result = evaluate_predictions(preds, refs, names, kind, stopped=stopped)
    sampled = [evaluate_predictions(s, refs, names, kind) for s in sampled_preds]
    if kind == "code":
        timeout = float(getattr(eval_cfg, "exec_timeout_s", 5.0))
        executed = execution_metrics(
            examples, preds, sampled_preds, ks=list(getattr(eval_cfg, "pass_k", [1])),
            limits=Limits(timeout=timeout),
        )  # fmt: skip
        for entry, extra in zip(result["per_example"], executed.pop("per_example", [])):
            if extra is not None:
                entry.update(extra)
        result.update(executed)
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
    result["stopped"] = list(stopped)
    result["seconds"] = round(time.time() - t0, 1)
    shown = f"rouge_l={result['rouge_l']:.1f}"
    if result.get("parse_rate") is not None:
        shown += f" parse_rate={result['parse_rate']:.0f}%"
    if result.get("clean_stop_rate") is not None:
        shown += f" clean_stop={result['clean_stop_rate']:.0f}%"
    if result.get("pass_at_1") is not None:
        shown += (f" pass@1={result['pass_at_1']:.1f}±{result['pass_at_1_stderr']:.1f}% "
                  f"format={result['format_rate']:.0f}%")  # fmt: skip
    print(f"[eval {label}] {shown} on {len(examples)} examples ({result['seconds']}s)", flush=True)
    return result


#: What a model row keeps of its HumanEval evaluation (``eval.humaneval``).
HUMANEVAL_KEYS = ("num_examples", "pass_at_1", "pass_at_1_stderr", "parse_rate",
                  "clean_stop_rate", "rouge_l", "seconds")  # fmt: skip


def humaneval_cfg(eval_cfg):
    """The eval settings of the HumanEval pass: greedy only, ``eval.humaneval_max_new_tokens``
    (HumanEval's whole functions are longer than a task's usual answers)."""
    from types import SimpleNamespace

    fields = {k: getattr(eval_cfg, k) for k in ("batch_size", "temperature", "exec_timeout_s")}
    return SimpleNamespace(**fields, max_new_tokens=eval_cfg.humaneval_max_new_tokens,
                           sample_seeds=[], pass_k=[1], num_report_samples=0)  # fmt: skip


def humaneval_summary(result: dict) -> dict:
    return {k: result[k] for k in HUMANEVAL_KEYS if k in result}
