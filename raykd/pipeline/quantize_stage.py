"""The last pipeline step: quantize the final student, then evaluate and measure what it costs.

For each method in ``quantize.methods`` (GPTQ first: the shipped checkpoint; RTN at the same
bits and group size: the baseline that shows what GPTQ's error feedback buys) a Ray task with
``quantize.cpus`` / ``quantize.gpus`` runs :func:`raykd.quantize.quantize` on the final student
with ``quantize.calibration`` prompt+response texts of the train split, writing
``models/quantized/<method>`` atomically. Each result is recorded in
``stages/quantize-<method>.json`` with the hash of what produced it and is skipped when
complete, like every stage.

Then every quantized model is evaluated by the same code as the float models (label
``student_<method>``), and the float student and each quantized one are measured in a fresh
worker process each (:func:`raykd.quantize.measure`: load time, peak load memory, greedy
tokens/s, size on disk, logical parameter count). The report's quantization section is built
from :func:`quantization_rows`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raykd.atomic import atomic_write_json
from raykd.config.quant import check_quant_config
from raykd.models import resolve_model
from raykd.pipeline.provenance import Provenance, digest
from raykd.quantize import checkpoint_stats, measure, quantize
from raykd.roles.factory import SlotPlacement, actor_threads
from raykd.roles.target_cache import model_fingerprint
from raykd.roles.tasks import run_task
from raykd.rundir import RunDir

#: The float student's label in the report (``student_before`` when no stage trains it).
FLOAT_LABEL = "student_after"
#: What a quantization row reports from :func:`raykd.quantize.measure`.
MEASURED = ("load_seconds", "load_peak_rss_mb", "peak_rss_mb", "tokens_per_second",
            "tokens_per_cpu_second", "new_tokens")  # fmt: skip


def student_shape_source(cfg, teacher_path: str) -> str | None:
    """The model directory whose ``config.json`` gives the student's layer sizes before the
    student exists: the teacher for a layer cut, the pretrained student itself; ``None`` when
    the sizes come from the config (checked at load, :mod:`raykd.config.validate`) or from
    width pruning (known once the student is built)."""
    sc = cfg.student
    if sc.init == "from_teacher":
        return teacher_path
    if sc.init == "pretrained":
        return resolve_model(sc.model)
    return None


def check_quantize_settings(cfg, model_dir: str | None) -> None:
    """``quantize.bits`` / ``group_size`` against the layer sizes in ``model_dir``'s
    ``config.json`` (no weights read). Nothing to check when quantization is off, without a
    directory, or for a Hub id (then :func:`raykd.quantize.quantize` checks the final student)."""
    qc = cfg.quantize
    if not qc.enabled or model_dir is None:
        return
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return
    try:
        check_quant_config(json.loads(config_file.read_text()), qc.bits, qc.group_size)
    except ValueError as err:
        raise ValueError(
            f"config key 'quantize.group_size'/'quantize.bits': {err} (model {model_dir})"
        ) from None


def _settings(cfg) -> dict[str, Any]:
    qc = cfg.quantize
    keys = ("bits", "group_size", "act_order", "sym", "damp_percent", "dtype",
            "max_calibration_tokens")  # fmt: skip
    return {k: qc[k] for k in keys}


def _placement(placement: SlotPlacement | None):
    return placement.take("quantize", 1) if placement is not None else None


def _quantize_one(cfg, rundir: RunDir, prov: Provenance, method: str, model_in: str,
                  calibration: list[str], placement) -> dict:  # fmt: skip
    qc = cfg.quantize
    out = rundir.model_dir("quantized") / method
    record = rundir.path("stages", f"quantize-{method}.json")
    key = digest({
        "method": method,
        "settings": _settings(cfg),
        "calibration": calibration if method == "gptq" else None,
        "model_in": model_fingerprint(model_in),
    })  # fmt: skip
    summary = prov.reuse(record, key, [out])
    if summary is not None:
        return summary
    print(f"[raykd] quantize {method} {qc.bits}-bit g{qc.group_size} -> {out}", flush=True)
    summary = run_task(
        quantize, model_in, str(out), method=method, calibration=calibration,
        **_settings(cfg),
        num_cpus=qc.cpus, num_gpus=qc.gpus,
        num_threads=actor_threads(qc.cpus, qc.num_threads),
        placement=_placement(placement), name=f"quantize-{method}",
    )  # fmt: skip
    summary["config_hash"] = key
    atomic_write_json(record, summary)
    return summary


def _measure_one(cfg, rundir: RunDir, prov: Provenance, label: str, model_dir: str,
                 prompts: list[str], placement) -> dict:  # fmt: skip
    """:func:`raykd.quantize.measure` in a fresh worker; reused while the model is unchanged."""
    qc = cfg.quantize
    record = rundir.path("eval", f"measure-{label}.json")
    key = digest({
        "model": model_fingerprint(model_dir),
        "prompts": prompts,
        "new_tokens": qc.measure_new_tokens,
        "threads": actor_threads(qc.cpus, qc.num_threads),
    })  # fmt: skip
    cached = prov.reuse(record, key, [], chain=False)  # like an evaluation
    if cached is not None:
        return cached
    result = run_task(
        measure, model_dir, prompts, max_new_tokens=qc.measure_new_tokens,
        num_cpus=qc.cpus, num_gpus=qc.gpus,
        num_threads=actor_threads(qc.cpus, qc.num_threads),
        placement=_placement(placement), fresh_process=True, name=f"measure-{label}",
    )  # fmt: skip
    result["config_hash"] = key
    result.pop("texts", None)
    atomic_write_json(record, result)
    return result


def run_quantize(
    cfg, rundir: RunDir, prov: Provenance, model_in: str, task,
    evaluate: Callable[[str, str], dict], placement: SlotPlacement | None = None,
    float_label: str = FLOAT_LABEL,
) -> dict:  # fmt: skip
    """Quantize ``model_in`` with every configured method, evaluate and measure; return
    ``{"settings", "methods": {method: summary}, "models": {label: eval}, "measured":
    {label: measurement}}``."""
    qc = cfg.quantize
    calibration = [ex.prompt_text + ex.reference for ex in task.train[: qc.calibration]]
    out: dict[str, Any] = {"settings": _settings(cfg), "calibration": len(calibration),
                           "methods": {}, "models": {}, "measured": {}}  # fmt: skip
    for method in qc.methods:
        out["methods"][method] = _quantize_one(
            cfg, rundir, prov, method, model_in, calibration, placement
        )
    labels = {float_label: model_in}
    labels.update({f"student_{m}": s["out_dir"] for m, s in out["methods"].items()})
    if qc.eval:
        for label, path in labels.items():
            if label != float_label:
                out["models"][label] = evaluate(label, path)
    prompts = [ex.prompt_text for ex in task.eval[: qc.measure_prompts]]
    if prompts:
        for label, path in labels.items():
            out["measured"][label] = _measure_one(
                cfg, rundir, prov, label, path, prompts, placement
            )
    return out


def quantization_rows(quant: dict, models: dict, float_label: str = FLOAT_LABEL) -> list[dict]:
    """One row per model (the float student first): method, bits, size on disk, logical
    parameters, the measurements, greedy agreement with the float student on the measured
    prompts, and the eval scores (Rouge-L, parse rate, pass@1 where run)."""
    measured = quant.get("measured", {})
    base_outputs = (measured.get(float_label) or {}).get("outputs")
    rows = []
    labels = [float_label] + [f"student_{m}" for m in quant.get("methods", {})]
    for label in labels:
        m = measured.get(label) or {}
        method = "float" if label == float_label else label.removeprefix("student_")
        summary = quant.get("methods", {}).get(method, {})
        row: dict[str, Any] = {"model": label, "method": method,
                               "bits": summary.get("bits"), "size_mb": m.get("size_mb"),
                               "params": m.get("params")}  # fmt: skip
        if not m and summary.get("out_dir"):
            stats = checkpoint_stats(summary["out_dir"])
            row.update(size_mb=stats["size_mb"], params=stats["params"])
        row.update({k: m.get(k) for k in MEASURED})
        outputs = m.get("outputs")
        if base_outputs and outputs and len(outputs) == len(base_outputs):
            same = sum(a == b for a, b in zip(outputs, base_outputs))
            row["greedy_agreement"] = 100.0 * same / len(outputs)
        ev = models.get(label) or {}
        for key in ("rouge_l", "parse_rate", "pass_at_1"):
            row[key] = ev.get(key)
        rows.append(row)
    float_size = rows[0].get("size_mb") if rows else None
    for row in rows:
        if float_size and row.get("size_mb") is not None:
            row["size_percent"] = 100.0 * row["size_mb"] / float_size
    return rows
