"""dense_kd end to end: teachers colocated in the learner actors, full-logit targets."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from raykd.config import ConfigError
from raykd.pipeline.run import run_pipeline

from .conftest import run_dir_of, tiny_config

pytestmark = pytest.mark.integration

FAST = ("pipeline.eval_teacher=false", "pipeline.eval_student_before=false")


def _rows(run_dir, stage):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage and "loss" in r]


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory) -> str:
    """Another sharpened tiny teacher (other seed, same tokenizer and width)."""
    from raykd.models import build_tiny_model, build_tiny_tokenizer, save_model

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=1, num_layers=4, hidden_size=64)
    model.model.norm.weight.data.mul_(8.0)
    path = tmp_path_factory.mktemp("models") / "tiny_teacher_2"
    save_model(model, tok, path)
    return str(path)


def test_dense_kd_taid_two_teachers_hidden(ray_node, tiny_teacher, second_teacher, tmp_path):
    cfg = tiny_config(
        tmp_path,
        tiny_teacher,
        *FAST,
        "pipeline.train=[dense_kd]",
        "dense_kd.objective=taid",
        "dense_kd.steps=6",
        "dense_kd.lr=1e-3",
        "dense_kd.alpha=0.9",
        "dense_kd.hidden_weight=0.5",
        f"dense_kd.extra_teachers=[{second_teacher}]",
        "pipeline.checkpoint_every=3",
    )
    run_dir = run_dir_of(run_pipeline(cfg))

    rows = _rows(run_dir, "1-dense_kd")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["hidden"] < rows[0]["hidden"]
    ts = [r["t"] for r in rows]
    assert ts[0] == pytest.approx(0.4)
    assert all(b >= a for a, b in zip(ts, ts[1:])) and ts[-1] > ts[0]
    # the schedule's state is checkpointed with the step (a resume continues the same t)
    state = json.loads((run_dir / "checkpoints" / "1-dense_kd" / "raykd_state.json").read_text())
    assert state["step"] == 3 and state["taid"]["num_steps"] == 3
    assert state["taid"]["t"] == pytest.approx(ts[3])

    # the projector trained with the student is not exported: the plain model reloads cleanly
    out = run_dir / "models" / "1-dense_kd"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "raykd_projector" in k]
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert model.config.num_hidden_layers == 2
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_dense_kd_reverse_kl_hidden_zero3_two_ranks(ray_node, tiny_teacher, tmp_path):
    """Full-logit reverse KL + hidden matching with the student (and its projector)
    partitioned by ZeRO-3 over two ranks, each rank holding its own colocated teacher."""
    cfg = tiny_config(
        tmp_path,
        tiny_teacher,
        *FAST,
        "pipeline.train=[dense_kd]",
        "dense_kd.divergence=reverse_kl",
        "dense_kd.alpha=0.9",
        "dense_kd.lr=1e-3",
        "dense_kd.steps=4",
        "dense_kd.hidden_weight=0.5",
        "dense_kd.hidden_kind=cosine",
        "learner.num_ranks=2",
        "learner.zero_stage=3",
        "learner.micro_batch_size=2",
    )
    run_dir = run_dir_of(run_pipeline(cfg))
    rows = _rows(run_dir, "1-dense_kd")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["kd"] < rows[0]["kd"]
    assert rows[-1]["hidden"] < rows[0]["hidden"]
    assert "t" not in rows[0]
    # the ZeRO-3 export gathers the full student and still drops the projector
    out = run_dir / "models" / "1-dense_kd"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert keys and not [k for k in keys if "raykd_projector" in k]
        assert all(f.get_tensor(k).numel() > 0 for k in keys)


@pytest.mark.parametrize("key", ["objective", "hidden_kind"])
def test_dense_kd_rejects_unknown_options_at_config_load(tiny_teacher, tmp_path, key):
    with pytest.raises(ConfigError, match=f"dense_kd.{key}' = 'nope'"):
        tiny_config(tmp_path, tiny_teacher, f"dense_kd.{key}=nope")
