"""Width pruning (raykd.models.width) on tiny random Llamas: sizes, exactness, ranking, files."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from raykd.models.io import count_parameters, save_model
from raykd.models.student import derive_student
from raykd.models.tiny import build_tiny_model, build_tiny_tokenizer
from raykd.models.width import (
    WidthImportance,
    WidthSizes,
    non_embedding_params,
    prune_width,
    solve_width,
    width_importance,
    width_student,
)

# hidden 64, 4 query heads / 2 KV heads of head_dim 16, MLP 128, 3 layers, vocabulary 259
PROMPTS = ["hello world", "def f(x):\n    return x * 2", "the quick brown fox", "a", "x = 1"]
FULL = WidthSizes(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _model(tokenizer, dtype=torch.float64, seed=0):
    model = build_tiny_model(tokenizer, seed=seed, num_layers=3, initializer_range=0.2)
    return model.to(dtype)


def _logits(model, tokenizer):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits, batch["attention_mask"].bool()


def test_parameter_count_after_pruning_is_exact(tokenizer):
    model = _model(tokenizer, torch.float32)
    sizes = WidthSizes(hidden_size=48, intermediate_size=64, num_attention_heads=2,
                       num_key_value_heads=1)  # fmt: skip
    student = prune_width(model, width_importance(model, tokenizer, PROMPTS), sizes)
    # per layer: q 48*32 + k 48*16 + v 48*16 + o 32*48 + MLP 3*48*64 + 2 norms * 48 = 13920
    expected = 3 * 13920 + 48  # + final norm
    assert count_parameters(student) == {"non_embedding": expected, "total": expected + 259 * 48}
    assert non_embedding_params(model, sizes) == expected
    cfg = student.config
    assert (cfg.hidden_size, cfg.intermediate_size) == (48, 64)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 16)
    assert student.get_input_embeddings().weight is student.get_output_embeddings().weight


def test_smollm2_sizes_for_the_64m_target():
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True)  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert count_parameters(model)["non_embedding"] == 106_203_456
    sizes = solve_width(model, 64_000_000)  # mlp + hidden, multiples of 16
    # hidden: a multiple of lcm(16, 9 heads) = 144 (transformers needs hidden % heads == 0)
    assert sizes == WidthSizes(432, 1120, 9, 3)
    # 30 * (432*64*(18+6) + 3*432*1120 + 2*432) + 432
    assert non_embedding_params(model, sizes) == 63_478_512
    assert 106_203_456 / 63_478_512 >= 1.65
    assert solve_width(model, 64_000_000, multiple=32) == WidthSizes(288, 1152, 9, 3)  # lcm 288
    heads = solve_width(model, 64_000_000, axes=("mlp", "heads"))
    assert heads == WidthSizes(576, 880, 6, 2)  # whole KV groups: 3 -> 2, each with 3 heads
    assert non_embedding_params(model, heads) == 30 * (576 * 64 * 16 + 3 * 576 * 880 + 1152) + 576
    with pytest.raises(ValueError, match="multiple of num_attention_heads=9"):
        solve_width(model, fixed={"hidden_size": 416})


def test_keeping_everything_reproduces_the_logits(tokenizer):
    model = _model(tokenizer)
    student = prune_width(model, width_importance(model, tokenizer, PROMPTS), FULL)
    assert torch.equal(_logits(student, tokenizer)[0], _logits(model, tokenizer)[0])


def test_pruning_dead_heads_and_channels_is_exact(tokenizer):
    """Units that never contribute (zero activations) get importance 0 and are the ones cut:
    the pruned model computes the same logits (float64)."""
    model = _model(tokenizer)
    dead = {0: [3, 50, 51, 100], 1: [0, 7, 64, 127], 2: [10, 20, 30, 40]}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.gate_proj.weight[dead[i]] = 0.0
            layer.mlp.up_proj.weight[dead[i]] = 0.0
            group = i % 2  # KV group whose values are zero: its 2 query heads output 0
            layer.self_attn.v_proj.weight[group * 16 : (group + 1) * 16] = 0.0
    importance = width_importance(model, tokenizer, PROMPTS)
    for i in range(3):
        assert importance.mlp[i, dead[i]].tolist() == [0.0] * 4
        assert (importance.mlp[i].count_nonzero()) == 124
        group = i % 2
        assert importance.heads[i, 2 * group : 2 * group + 2].tolist() == [0.0, 0.0]
        assert importance.heads[i, 2 * (1 - group) : 2 * (1 - group) + 2].min() > 0
    sizes = WidthSizes(hidden_size=64, intermediate_size=124, num_attention_heads=2,
                       num_key_value_heads=1)  # fmt: skip
    student = prune_width(model, importance, sizes)
    assert student.config.raykd_student["width"]["kv_heads"] == [[1], [0], [1]]
    got, mask = _logits(student, tokenizer)
    want, _ = _logits(model, tokenizer)
    torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=1e-10)
    kept = [c for c in range(128) if c not in dead[1]]
    assert torch.equal(student.model.layers[1].mlp.down_proj.weight,
                       model.model.layers[1].mlp.down_proj.weight[:, kept])  # fmt: skip


def test_ranking_keeps_the_most_important_units(tokenizer):
    model = _model(tokenizer)
    loud = [5, 17, 90]
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[loud] *= 50.0
        model.model.layers[0].self_attn.v_proj.weight[16:32] *= 30.0  # KV group 1 of layer 0
        model.model.embed_tokens.weight[:, [3, 40]] *= 100.0
    importance = width_importance(model, tokenizer, PROMPTS)
    assert set(importance.mlp[1].topk(3).indices.tolist()) == set(loud)
    assert set(importance.hidden.topk(2).indices.tolist()) == {3, 40}
    sizes = WidthSizes(hidden_size=64, intermediate_size=3, num_attention_heads=2,
                       num_key_value_heads=1)  # fmt: skip
    student = prune_width(model, importance, sizes)
    assert student.config.raykd_student["width"]["kv_heads"][0] == [1]
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight,
                       model.model.layers[1].mlp.up_proj.weight[loud])  # fmt: skip
    assert torch.equal(student.model.layers[0].self_attn.k_proj.weight,
                       model.model.layers[0].self_attn.k_proj.weight[16:32])  # fmt: skip


def test_given_importance_decides_the_kept_indices(tokenizer):
    model = _model(tokenizer)
    hidden = torch.zeros(64, dtype=torch.float64)
    hidden[[60, 2, 33, 9]] = torch.tensor(
        [4.0, 3.0, 2.0, 1.0], dtype=torch.float64
    )  # top 3: 60, 2, 33
    heads = torch.tensor([[1.0, 5.0, 2.0, 2.0], [0.0, 0.0, 3.0, 1.0], [9.0, 0.0, 0.0, 8.0]])
    # groups (heads 0-1, 2-3): layer 0 sums 6 vs 4 -> group 0, head 1; layer 2 9 vs 8 -> group 0
    mlp = torch.arange(128, dtype=torch.float64).flip(0).repeat(3, 1)  # channel 0 largest
    importance = WidthImportance(heads=heads.double(), mlp=mlp, hidden=hidden)
    sizes = WidthSizes(hidden_size=3, intermediate_size=2, num_attention_heads=1,
                       num_key_value_heads=1)  # fmt: skip
    student = prune_width(model, importance, sizes)
    assert student.config.raykd_student["width"]["kv_heads"] == [[0], [1], [0]]
    emb = model.model.embed_tokens.weight
    assert torch.equal(student.model.embed_tokens.weight, emb[:, [2, 33, 60]])
    attn, src = student.model.layers[0].self_attn, model.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.weight, src.q_proj.weight[16:32][:, [2, 33, 60]])
    assert torch.equal(attn.o_proj.weight, src.o_proj.weight[[2, 33, 60]][:, 16:32])
    assert torch.equal(student.model.layers[1].self_attn.q_proj.weight,
                       model.model.layers[1].self_attn.q_proj.weight[32:48][:, [2, 33, 60]])  # fmt: skip
    assert torch.equal(student.model.layers[2].mlp.gate_proj.weight,
                       model.model.layers[2].mlp.gate_proj.weight[[0, 1]][:, [2, 33, 60]])  # fmt: skip
    assert torch.equal(student.model.norm.weight, model.model.norm.weight[[2, 33, 60]])


def test_importance_ignores_padding_and_aggregates(tokenizer):
    model = _model(tokenizer)
    for aggregate in ("mean_abs", "l2"):
        batched = width_importance(model, tokenizer, PROMPTS, aggregate=aggregate, batch_size=5)
        single = width_importance(model, tokenizer, PROMPTS, aggregate=aggregate, batch_size=1)
        assert batched.tokens == single.tokens == sum(len(tokenizer(p).input_ids) for p in PROMPTS)
        for a, b in ((batched.heads, single.heads), (batched.mlp, single.mlp),
                     (batched.hidden, single.hidden)):  # fmt: skip
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # independent: the last layer's down_proj inputs, captured here
    seen = []
    hook = model.model.layers[2].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0][0])
    )
    with torch.no_grad():
        for p in PROMPTS:
            model(**tokenizer([p], return_tensors="pt"))
    hook.remove()
    acts = torch.cat(seen)
    torch.testing.assert_close(single.mlp[2], acts.pow(2).mean(0).sqrt())
    mean_abs = width_importance(model, tokenizer, PROMPTS, batch_size=1)
    torch.testing.assert_close(mean_abs.mlp[2], acts.abs().mean(0))


def test_saved_student_reloads_and_generates(tokenizer, tmp_path):
    model = _model(tokenizer, torch.float32)
    student, info = width_student(model, tokenizer, PROMPTS, target_non_embedding_params=60_000,
                                  axes=("mlp", "hidden", "heads"), multiple=16)  # fmt: skip
    assert info["to"] == {"hidden_size": 48, "intermediate_size": 96,
                          "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
    # 3 * (48*16*(2*2 + 2*1) + 3*48*96 + 2*48) + 48
    assert info["non_embedding_params"] == 3 * (48 * 16 * 6 + 3 * 48 * 96 + 96) + 48 <= 60_000
    save_model(student, tokenizer, tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert config["raykd_student"]["width"]["to"]["hidden_size"] == 48
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert type(loaded) is LlamaForCausalLM
    assert (loaded.config.hidden_size, loaded.config.head_dim) == (48, 16)
    batch = tokenizer(["def add(a, b):"], return_tensors="pt")
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        want = student.eval().generate(**batch, **kwargs)
        got = loaded.generate(**batch, **kwargs)
    assert got.shape == (1, batch["input_ids"].shape[1] + 8)
    assert torch.equal(got, want)


def test_composes_with_a_layer_cut(tokenizer):
    model = _model(tokenizer, torch.float32)
    cut = derive_student(model, [0, 2], rule="explicit", teacher_name="tiny")
    student, info = width_student(cut, tokenizer, PROMPTS,
                                  fixed={"intermediate_size": 32, "num_key_value_heads": 1})  # fmt: skip
    record = student.config.raykd_student
    assert record["layers"] == [0, 2] and record["teacher"] == "tiny"
    assert record["width"]["to"] == {"hidden_size": 64, "intermediate_size": 32,
                                     "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
    assert student.config.num_hidden_layers == 2
    assert info["non_embedding_params"] == 2 * (64 * 16 * 6 + 3 * 64 * 32 + 128) + 64


def test_bad_requests_fail_clearly(tokenizer):
    model = _model(tokenizer, torch.float32)
    with pytest.raises(ValueError, match="no sizes reach 1,000"):
        solve_width(model, 1_000)
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        solve_width(model, fixed={"num_attention_heads": 3})
    with pytest.raises(ValueError, match="must be in"):
        solve_width(model, fixed={"hidden_size": 65})
    with pytest.raises(ValueError, match="unknown width setting"):
        solve_width(model, fixed={"width": 3})
    with pytest.raises(ValueError, match="needs a target"):
        width_student(model, tokenizer, PROMPTS)


def test_pipeline_builds_a_width_student(tokenizer, tmp_path):
    """``student.init=width`` in build_student: layers cut first when ``keep`` is given."""
    from raykd.config import load_config
    from raykd.pipeline.run import build_student

    save_model(_model(tokenizer, torch.float32), tokenizer, tmp_path / "teacher")
    common = [f"teacher.model={tmp_path / 'teacher'}", "student.init=width",
              "student.width_multiple=16", "student.target_non_embedding_params=30000"]  # fmt: skip
    cfg = load_config(None, common)
    info = build_student(cfg, str(tmp_path / "teacher"), PROMPTS, tmp_path / "s1")
    assert info["rule"] == "width" and info["layers"] == [0, 1, 2]
    assert info["width"]["to"]["hidden_size"] < 64
    assert info["params"]["non_embedding"] == info["width"]["non_embedding_params"] <= 30_000
    assert info["teacher_params"] == count_parameters(_model(tokenizer))
    cut = load_config(None, [*common, "student.rule=first_last", "student.keep=2"])
    info = build_student(cut, str(tmp_path / "teacher"), PROMPTS, tmp_path / "s2")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s2")
    assert info["layers"] == [0, 2] and loaded.config.num_hidden_layers == 2
    assert count_parameters(loaded) == info["params"]
    assert info["params"]["non_embedding"] <= 30_000
