"""The quantize stage end to end: real Ray tasks, real GPTQModel, real rollout workers.

A tiny teacher -> 2-layer student -> 2 SFT steps -> GPTQ and RTN (4-bit, group 32) as Ray
tasks -> each quantized model evaluated by the rollout workers and measured in a fresh
process -> the report's quantization table. Then the same command again reuses everything.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from raykd.data import load_task
from raykd.models import load_model, load_tokenizer
from raykd.pipeline.run import run_pipeline
from raykd.quantize import checkpoint_stats
from raykd.roles.rollout import HFRolloutWorker

from .conftest import run_dir_of, tiny_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("gptqmodel") is None, reason="needs the 'quant' extra"
    ),
]

ARGS = (
    "pipeline.train=[sft]",
    "sft.steps=2",
    "pipeline.eval_teacher=false",
    "eval.sample_seeds=[]",
    "quantize.enabled=true",
    "quantize.calibration=4",
    "quantize.group_size=32",
    "quantize.measure_prompts=2",
    "quantize.measure_new_tokens=4",
)


@pytest.fixture(scope="module")
def quantized_run(ray_node, tiny_teacher, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quantize_stage")
    cfg = tiny_config(tmp, tiny_teacher, *ARGS)
    return cfg, run_dir_of(run_pipeline(cfg))


def test_quantize_stage_writes_loads_and_reports(quantized_run, tiny_teacher):
    cfg, run_dir = quantized_run
    final = run_dir / "models" / "final"
    float_params = checkpoint_stats(final)["params"]
    for method in ("gptq", "rtn"):
        out = run_dir / "models" / "quantized" / method
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert (qc["quant_method"], qc["bits"], qc["group_size"]) == ("gptq", 4, 32)
        record = json.loads((run_dir / "stages" / f"quantize-{method}.json").read_text())
        assert record["method"] == method and record["config_hash"]
        assert record["calibration_used"] == (4 if method == "gptq" else 0)
        # packed weights count as the weights they encode: the same logical parameter count
        assert checkpoint_stats(out)["params"] == float_params
        # the loader every role uses (raykd.models.load_model) takes the packed checkpoint
        model = load_model(str(out))
        assert type(model.model.layers[0].mlp.down_proj).__module__.startswith("gptqmodel")

    report = json.loads((run_dir / "report.json").read_text())
    rows = report["quantization"]["rows"]
    assert [r["method"] for r in rows] == ["float", "gptq", "rtn"]
    assert rows[0]["model"] == "student_after"
    for row in rows:
        assert row["params"] == float_params
        assert row["new_tokens"] == 2 * 4  # 2 measured prompts x 4 greedy tokens
        assert row["tokens_per_second"] > 0 and row["load_seconds"] > 0
        assert row["load_peak_rss_mb"] >= 0
        assert row["rouge_l"] == report["models"][row["model"]]["rouge_l"]
    sizes = {r["method"]: r["size_mb"] for r in rows}
    assert sizes["gptq"] < sizes["float"] and sizes["rtn"] < sizes["float"]
    assert rows[1]["size_percent"] == pytest.approx(100 * sizes["gptq"] / sizes["float"])
    assert rows[0]["greedy_agreement"] == 100.0
    md = (run_dir / "report.md").read_text()
    assert "## Quantization" in md and "| student_gptq | gptq |" in md


def test_quantized_eval_decodes_with_the_quantized_weights(quantized_run, tiny_teacher):
    """What the rollout actor decoded for ``student_gptq`` is what the packed checkpoint
    decodes in this process (so the eval ran on the quantized model, not the float one)."""
    cfg, run_dir = quantized_run
    evaluated = json.loads((run_dir / "eval" / "student_gptq.json").read_text())
    task = load_task(
        cfg.data.task, load_tokenizer(tiny_teacher), path=cfg.data.path,
        max_length=cfg.data.max_length, num_train=cfg.data.num_train,
        num_eval=cfg.data.num_eval, eval_fraction=cfg.data.eval_fraction, seed=cfg.run.seed,
        system_prompt=cfg.data.system_prompt,
    )  # fmt: skip
    worker = HFRolloutWorker(str(run_dir / "models" / "quantized" / "gptq"))
    direct = worker.generate_texts(
        [ex.prompt_ids for ex in task.eval], max_new_tokens=cfg.eval.max_new_tokens, greedy=True
    )
    assert evaluated["predictions"] == direct


def test_rerun_reuses_quantized_models(quantized_run, tiny_teacher):
    cfg, run_dir = quantized_run
    watched = [run_dir / "stages" / "quantize-gptq.json",
               run_dir / "models" / "quantized" / "gptq" / "config.json",
               run_dir / "eval" / "measure-student_gptq.json"]  # fmt: skip
    before = [p.stat().st_mtime_ns for p in watched]
    run_pipeline(cfg)
    assert [p.stat().st_mtime_ns for p in watched] == before
