"""Tests for raykd.models.io: atomic saving, parameter counting, on-disk size."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raykd.atomic import publish_dir
from raykd.models.io import count_parameters, model_size_mb, save_model
from raykd.models.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_save_reload_identical_logits(tokenizer, tmp_path):
    model = build_tiny_model(tokenizer, seed=0)
    path = save_model(model, tokenizer, tmp_path / "out" / "model")
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    batch = tokenizer(["hello there", "x"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)
    assert AutoTokenizer.from_pretrained(path)("hi")["input_ids"] == tokenizer("hi")["input_ids"]


def test_save_replaces_existing_dir_whole(tokenizer, tmp_path):
    target = tmp_path / "model"
    save_model(build_tiny_model(tokenizer, seed=0), tokenizer, target)
    (target / "stale.txt").write_text("old")
    new = build_tiny_model(tokenizer, seed=1)
    save_model(new, None, target)
    assert not (target / "stale.txt").exists() and not (target / "tokenizer.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    assert torch.equal(reloaded.lm_head.weight, new.lm_head.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp or old dirs left


def test_publish_without_replace_keeps_existing(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "winner").write_text("1")
    (tmp_path / "staged").mkdir()
    (tmp_path / "staged" / "loser").write_text("2")
    assert publish_dir(tmp_path / "staged", tmp_path / "target", replace=False) is False
    assert [p.name for p in (tmp_path / "target").iterdir()] == ["winner"]
    assert publish_dir(tmp_path / "staged", tmp_path / "target", replace=True) is True
    assert [p.name for p in (tmp_path / "target").iterdir()] == ["loser"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_count_parameters_tied_and_untied():
    tied = build_tiny_model(100, hidden_size=64, num_layers=2)
    untied = build_tiny_model(100, hidden_size=64, num_layers=2, tie_word_embeddings=False)
    tied_counts, untied_counts = count_parameters(tied), count_parameters(untied)
    assert tied_counts["total"] == sum(p.numel() for p in tied.parameters())
    assert untied_counts["total"] == tied_counts["total"] + 100 * 64
    assert tied_counts["non_embedding"] == untied_counts["non_embedding"]
    assert tied_counts["total"] - tied_counts["non_embedding"] == 100 * 64


def test_model_size_mb(tokenizer, tmp_path):
    model = build_tiny_model(tokenizer, seed=0)
    path = save_model(model, tokenizer, tmp_path / "m")
    weights = (path / "model.safetensors").stat().st_size
    assert model_size_mb(path) == pytest.approx(weights / 2**20)
    assert model_size_mb(path / "model.safetensors") == model_size_mb(path)
    params_mb = count_parameters(model)["total"] * 4 / 2**20
    assert params_mb <= model_size_mb(path) < params_mb * 1.05
    with pytest.raises(FileNotFoundError):
        model_size_mb(tmp_path / "missing")
