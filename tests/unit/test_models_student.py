"""Tests for raykd.models.student on tiny random models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from raykd.models.io import save_model
from raykd.models.student import (
    DEFAULT_CALIBRATION_PROMPTS,
    angular_distances,
    decoder_layers,
    derive_student,
    select_layers,
    student_from_teacher,
)
from raykd.models.tiny import build_tiny_model, build_tiny_tokenizer, from_config

QWEN3_SLIDING = {
    "model_type": "qwen3",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "use_sliding_window": True,
    "sliding_window": 4,
    "layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
    "initializer_range": 0.2,
}
PROMPTS = ["hello world", "def f(x):\n    return x * 2", "the quick brown fox jumps", "a"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def teacher(tokenizer):
    # initializer_range 0.2 makes layers move the residual stream visibly (non-flat logits).
    return build_tiny_model(tokenizer, seed=0, num_layers=6, initializer_range=0.2)


def _batch(tokenizer):
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


# -- select_layers --------------------------------------------------------------------------


def test_every_other():
    assert select_layers(5, "every_other") == [0, 2, 4]
    assert select_layers(7, "every_other") == [0, 2, 4, 6]
    assert select_layers(6, "every_other") == [0, 2, 3, 5]
    assert select_layers(30, "every_other", keep=16) == [
        0,
        2,
        4,
        6,
        8,
        10,
        12,
        14,
        15,
        17,
        19,
        21,
        23,
        25,
        27,
        29,
    ]
    assert select_layers(30, "every_other", keep=10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert select_layers(4, "every_other", keep=4) == [0, 1, 2, 3]


def test_first_last():
    assert select_layers(10, "first_last", keep=4) == [0, 1, 8, 9]
    assert select_layers(10, "first_last", keep=5) == [0, 1, 2, 8, 9]
    assert select_layers(6, "first_last") == [0, 1, 4, 5]


def test_angular_picks_min_block_but_keeps_first_and_last():
    # block size 2 over 6 layers: starts 0..4; 0 and 4 would drop layer 0 / layer 5.
    distances = [0.0, 0.5, 0.2, 0.9, 0.0]
    assert select_layers(6, "angular", keep=4, distances=distances) == [0, 1, 4, 5]
    assert select_layers(6, "angular", keep=4, distances=[0.0, 0.3, 0.3, 0.3, 0.0]) == [0, 3, 4, 5]
    assert select_layers(6, "angular", keep=4, distances=[0.0, math.nan, 0.3, 0.1, 0.0]) == [
        0,
        1,
        2,
        5,
    ]
    with pytest.raises(ValueError, match="expected 5 distances"):
        select_layers(6, "angular", keep=4, distances=[0.1] * 4)
    with pytest.raises(ValueError, match="needs `distances`"):
        select_layers(6, "angular", keep=4)


@pytest.mark.parametrize(
    ("layers", "match"),
    [
        ([0, 2, 6], "index 6 at position 2 is out of range"),
        ([0, -1], "index -1 at position 1"),
        ([0, 3, 2], "index 2 at position 2 is not greater"),
        ([1, 1], "index 1 at position 1 is not greater"),
        ([0, 1.5], "1.5 at position 1 is not an integer"),
        ([], "at least one"),
    ],
)
def test_explicit_validation(layers, match):
    with pytest.raises(ValueError, match=match):
        select_layers(6, "explicit", layers=layers)


def test_explicit_and_bad_arguments():
    assert select_layers(6, "explicit", layers=[0, 3, 5]) == [0, 3, 5]
    with pytest.raises(ValueError, match="keep=2 does not match"):
        select_layers(6, "explicit", keep=2, layers=[0, 3, 5])
    with pytest.raises(ValueError, match="unknown layer rule 'middle'"):
        select_layers(6, "middle", keep=3)
    with pytest.raises(ValueError, match="keep=7"):
        select_layers(6, "first_last", keep=7)
    with pytest.raises(ValueError, match="keep must be >= 2"):
        select_layers(6, "every_other", keep=1)


# -- derive_student -------------------------------------------------------------------------


def test_all_layer_student_equals_teacher(teacher, tokenizer):
    student = derive_student(teacher, range(6))
    batch = _batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(student(**batch).logits, teacher(**batch).logits)
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    assert (
        student.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()
    )


def test_student_equals_teacher_without_dropped_layers(teacher, tokenizer):
    kept = [0, 2, 3, 5]
    student = derive_student(teacher, kept, rule="explicit", teacher_name="tiny")
    manual = copy.deepcopy(teacher)
    manual.model.layers = nn.ModuleList([manual.model.layers[i] for i in kept])
    manual.config.num_hidden_layers = len(kept)
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected = manual(**batch, use_cache=False).logits
        torch.testing.assert_close(student(**batch).logits, expected, rtol=0, atol=0)
    assert student.config.num_hidden_layers == 4 and teacher.config.num_hidden_layers == 6
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2, 3]
    provenance = {"teacher": "tiny", "teacher_num_layers": 6, "layers": kept, "rule": "explicit"}
    assert student.config.raykd_student == provenance
    assert not student.training


def test_student_generation_with_cache_matches_without(teacher, tokenizer):
    student = derive_student(teacher, [0, 3, 5])
    prompt = tokenizer(["The answer is", "Once upon a "], return_tensors="pt", padding=True)
    prompt = {k: v[:, :10] for k, v in prompt.items()}  # equal lengths: no padding involved
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    cached = student.generate(**prompt, use_cache=True, **settings)
    uncached = student.generate(**prompt, use_cache=False, **settings)
    assert cached.shape[1] > 10 and torch.equal(cached, uncached)


def test_sliding_window_layer_types_are_sliced(tokenizer):
    teacher = from_config({**QWEN3_SLIDING, "vocab_size": len(tokenizer)}, seed=1)
    student = derive_student(teacher, [0, 1, 3])
    assert student.config.layer_types == [
        "full_attention",
        "sliding_attention",
        "sliding_attention",
    ]
    prompt = tokenizer(["a longer prompt than the window"], return_tensors="pt")
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    assert torch.equal(
        student.generate(**prompt, use_cache=True, **settings),
        student.generate(**prompt, use_cache=False, **settings),
    )


def test_provenance_survives_save_and_load(teacher, tokenizer, tmp_path):
    student = derive_student(teacher, [0, 5], rule="first_last", teacher_name="tiny-teacher")
    save_model(student, tokenizer, tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert reloaded.config.raykd_student["layers"] == [0, 5]
    assert reloaded.config.raykd_student["rule"] == "first_last"
    assert reloaded.config.num_hidden_layers == 2


def test_decoder_layers_finds_the_stack(teacher):
    name, layers = decoder_layers(teacher)
    assert name == "model.layers" and layers is teacher.model.layers


# -- angular distances ----------------------------------------------------------------------


def _with_identity_layers(model, identity):
    planted = copy.deepcopy(model)
    for index in identity:
        layer = planted.model.layers[index]
        nn.init.zeros_(layer.self_attn.o_proj.weight)
        nn.init.zeros_(layer.mlp.down_proj.weight)
    return planted


def test_angular_rule_finds_planted_identity_block(tokenizer):
    base = build_tiny_model(tokenizer, seed=2, num_layers=8, initializer_range=0.2)
    planted = _with_identity_layers(base, [3, 4])
    distances = angular_distances(planted, tokenizer, PROMPTS, block_size=2)
    assert len(distances) == 7 and all(math.isfinite(d) for d in distances)
    assert distances[3] < 1e-3 < min(d for i, d in enumerate(distances) if i != 3)
    assert select_layers(8, "angular", keep=6, distances=distances) == [0, 1, 2, 5, 6, 7]
    student = student_from_teacher(planted, tokenizer, rule="angular", keep=6, prompts=PROMPTS)
    assert student.config.raykd_student["layers"] == [0, 1, 2, 5, 6, 7]
    batch = _batch(tokenizer)
    with torch.no_grad():  # dropping identity layers changes nothing
        torch.testing.assert_close(student(**batch).logits, planted(**batch).logits)


def test_angular_ignores_padding(teacher, tokenizer):
    one_by_one = angular_distances(teacher, tokenizer, PROMPTS, block_size=3, batch_size=1)
    padded = angular_distances(teacher, tokenizer, PROMPTS, block_size=3, batch_size=4)
    assert one_by_one == pytest.approx(padded, abs=1e-5)
    assert len(padded) == 4 and 0 < min(padded) and max(padded) < 1


def test_angular_last_state_is_pre_norm(teacher, tokenizer):
    """The block ending at the last layer uses that layer's raw output, not the final norm's."""
    distances = angular_distances(teacher, tokenizer, PROMPTS[:1], block_size=6)
    captured = {}
    hook = teacher.model.layers[-1].register_forward_hook(lambda m, a, out: captured.update(x=out))
    batch = tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        embeddings = teacher(**batch, output_hidden_states=True).hidden_states[0]
    hook.remove()
    cos = torch.nn.functional.cosine_similarity(embeddings[0], captured["x"][0], dim=-1)
    expected = (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item()
    assert distances == [pytest.approx(expected, abs=1e-6)]


def test_student_from_teacher_rules(teacher, tokenizer):
    assert student_from_teacher(teacher, rule="every_other", keep=3).config.raykd_student[
        "layers"
    ] == [0, 3, 5]
    angular = student_from_teacher(teacher, tokenizer, keep=4, prompts=DEFAULT_CALIBRATION_PROMPTS)
    layers = angular.config.raykd_student["layers"]
    assert len(layers) == 4 and layers[0] == 0 and layers[-1] == 5
    with pytest.raises(ValueError, match="needs a tokenizer"):
        student_from_teacher(teacher, None, rule="angular", keep=4)
