"""Integration fixtures: one real local Ray node per session, tiny real models on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raykd.config import load_config

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(scope="session")
def ray_node(tmp_path_factory):
    import ray

    from raykd.roles.runtime import init_ray

    old = os.environ.get("RAYKD_CACHE")
    os.environ["RAYKD_CACHE"] = str(tmp_path_factory.mktemp("raykd_cache"))  # teacher targets
    init_ray(num_cpus=2)
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("RAYKD_CACHE", None)
    else:
        os.environ["RAYKD_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """A 4-layer random Llama with a byte-level ChatML tokenizer, saved as safetensors."""
    from raykd.models import build_tiny_model, build_tiny_tokenizer, save_model

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0, num_layers=4, hidden_size=64)
    # Sharpen the random teacher (8x logits) so that its distributions are peaked and a
    # student cut from it starts measurably far from it in KL.
    model.model.norm.weight.data.mul_(8.0)
    path = tmp_path_factory.mktemp("models") / "tiny_teacher"
    save_model(model, tok, path)
    return str(path)


def tiny_config(tmp_path: Path, teacher: str, *overrides: str):
    """A pipeline config on the tiny teacher and the Dolly fixture, sized for seconds."""
    base = [
        f"run.output_dir={tmp_path}",
        "run.name=t",
        f"teacher.model={teacher}",
        "teacher.top_k=16",
        "teacher.batch_size=4",
        "student.init=from_teacher",
        "student.rule=every_other",
        "student.keep=2",
        "data.task=dolly",
        f"data.path={FIXTURES / 'dolly_en.jsonl'}",
        "data.max_length=512",
        "data.num_train=4",
        "data.eval_fraction=0.25",
        "data.num_eval=2",
        "learner.micro_batch_size=4",
        "learner.lr=1e-2",
        "rollout.num_workers=1",
        "rollout.max_new_tokens=12",
        "eval.max_new_tokens=8",
        "eval.batch_size=2",
        "eval.sample_seeds=[1]",
        "pipeline.checkpoint_every=0",
    ]
    return load_config(None, base + list(overrides))


def run_dir_of(results: dict) -> Path:
    """The run directory of :func:`raykd.pipeline.run.run_pipeline`'s results."""
    return Path(results["run_dir"])
