"""raykd.quantize on a tiny random Llama: GPTQ and RTN at 4 bits, reload, accounting, error.

Needs the ``quant`` extra (gptqmodel, optimum) for everything but the pure checks. The
first GPTQ run on a machine JIT-builds GPTQModel's CPU packing kernel into
``~/.cache/gptqmodel`` (~35 s on 2 cores); later runs take ~25 s for this file.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from raykd.models import build_tiny_model, build_tiny_tokenizer, count_parameters, save_model
from raykd.quantize import (
    check_quant_config,
    check_quant_settings,
    checkpoint_stats,
    dequantize,
    greedy_agreement,
    load_quantized,
    measure,
    output_error,
    quantize,
    read_summary,
    rtn_quantize_weight,
    weight_error,
)
from raykd.quantize.gptq_format import pack_linear, pack_rows, unpack_linear, unpack_rows
from raykd.quantize.rtn import quantized_linears

HAVE_GPTQMODEL = importlib.util.find_spec("gptqmodel") is not None  # find, never import
needs_quant = pytest.mark.skipif(not HAVE_GPTQMODEL, reason="needs the 'quant' extra")

SMOLLM2 = {  # the teacher's config.json, as far as the checks read it
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
}
GROUP = 32
CALIBRATION = [
    f"def scale_{i}(values, factor={i}):\n    return [v * factor + {i * i} for v in values]\n"
    for i in range(24)
]


# ---------------------------------------------------------------- settings (no model, no gptqmodel)


def test_settings_accept_the_teachers_shape():
    dims = check_quant_config(SMOLLM2, bits=4, group_size=64)
    assert dims == {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "attention_size": 576,
        "kv_size": 192,
    }
    check_quant_config(SMOLLM2, bits=3, group_size=32, method="gptq")
    check_quant_settings(8, -1, 576)


@pytest.mark.parametrize(
    ("bits", "group_size", "model", "named"),
    [
        (5, 64, SMOLLM2, "bits=5"),
        (True, 64, SMOLLM2, "bits=True"),
        (4, 128, SMOLLM2, "hidden_size=576"),  # 576 = 4.5 * 128
        (4, 48, SMOLLM2, "group_size=48"),  # divides 576 but no kernel takes it
        (4, 1024, {**SMOLLM2, "hidden_size": 1024, "num_attention_heads": 8}, "intermediate_size"),
        (3, -1, {"hidden_size": 80}, "bits=3 needs"),  # 80 codes of 3 bits != whole words
        (4, 64, 96, "hidden_size=96"),
    ],
)
def test_bad_settings_raise_naming_the_setting(bits, group_size, model, named):
    with pytest.raises(ValueError, match=named):
        check_quant_settings(bits, group_size, model)


def test_settings_from_a_model_a_config_and_a_directory(tmp_path):
    model = build_tiny_model(hidden_size=64, num_layers=1)
    check_quant_settings(4, 32, model)
    check_quant_settings(4, 32, model.config)
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="group_size=256 does not divide hidden_size=64"):
        check_quant_settings(4, 256, tmp_path)
    with pytest.raises(ValueError, match="method='awq'"):
        check_quant_settings(4, 32, method="awq")


# ---------------------------------------------------------------- packing and RTN math


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_pack_rows_round_trips(bits):
    codes = torch.randint(0, 2**bits, (64, 24))
    words = pack_rows(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (64 * bits // 32, 24)
    assert torch.equal(unpack_rows(words, bits), codes)


def test_pack_rows_matches_the_gptq_layout():
    codes = torch.randint(0, 16, (16, 3))
    expected = torch.zeros(2, 3, dtype=torch.int64)
    for i in range(16):  # GPTQ 4-bit: 8 codes per word, code i at bits 4*(i % 8)
        expected[i // 8] |= codes[i] << (4 * (i % 8))
    assert torch.equal(pack_rows(codes, 4).long() & 0xFFFFFFFF, expected)
    three = torch.zeros(32, 1, dtype=torch.int64)
    three[10] = 0b101  # code 10 straddles words 0 and 1: bits 30, 31 | bit 0
    words = pack_rows(three, 3).long() & 0xFFFFFFFF
    assert words[0, 0] == 0b01 << 30 and words[1, 0] == 0b1 and words[2, 0] == 0


def test_rtn_follows_its_formula():
    torch.manual_seed(0)
    w = torch.randn(6, 64)
    w[0, :GROUP] = 0.0  # an all-zero group
    w[1, :GROUP] = w[1, :GROUP].abs()  # a group with min >= 0: zero point 0
    r = rtn_quantize_weight(w, bits=4, group_size=GROUP)
    g = w.reshape(6, 2, GROUP)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    s = ((hi - lo) / 15).half().float()
    s[0, 0] = 2 / 15.0  # zeros get the range [-1, 1]
    assert torch.allclose(r.scales, s.half().float())
    assert r.zeros[1, 0] == 0 and r.zeros.min() >= 0 and r.zeros.max() <= 15
    q = torch.clamp(torch.round(g / r.scales[..., None]) + r.zeros[..., None], 0, 15)
    assert torch.equal(r.codes, q.reshape(6, 64).long())
    w_hat = dequantize(r)
    assert torch.all((w_hat - w).abs().reshape(6, 2, GROUP) <= r.scales[..., None] / 2 + 1e-6)
    assert torch.all(w_hat[0, :GROUP] == 0)  # zero is exactly representable
    sym = rtn_quantize_weight(w, bits=4, group_size=GROUP, sym=True)
    assert torch.all(sym.zeros == 8)


@pytest.mark.parametrize(
    ("bits", "fmt", "sym"), [(4, "gptq_v2", False), (3, "gptq_v2", False), (8, "gptq", True)]
)
def test_packed_layer_dequantizes_to_the_rtn_weight(bits, fmt, sym):
    w = torch.randn(32, 128)
    r = rtn_quantize_weight(w, bits=bits, group_size=GROUP, sym=sym)
    tensors = pack_linear(r.codes, r.scales, r.zeros, bits, GROUP, fmt)
    assert tensors["qweight"].shape == (128 * bits // 32, 32)
    assert tensors["qzeros"].shape == (128 // GROUP, 32 * bits // 32)
    codes, zeros, scales, g_idx = unpack_linear(tensors, bits, fmt)
    assert torch.equal(codes, r.codes) and torch.equal(zeros.t(), r.zeros)
    w_hat = (codes - zeros[g_idx].t()) * scales[g_idx].t()
    assert torch.equal(w_hat, dequantize(r))


def test_greedy_agreement():
    assert greedy_agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6]]) == {
        "exact": 0.5,
        "prefix": 0.75,
    }


# ---------------------------------------------------------------- end to end on a tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved random Llama: hidden 64 (2 groups of 32), 2 layers, GQA, tied embeddings."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, intermediate_size=128)
    path = save_model(model, tokenizer, tmp_path_factory.mktemp("fp") / "model")
    return model, tokenizer, path


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    _, _, path = tiny
    root = tmp_path_factory.mktemp("quantized")
    env = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_CACHE", "PYTORCH_ALLOC_CONF")}
    out = {}
    for method in ("gptq", "rtn"):
        out[method] = quantize(
            path, root / method, method=method, bits=4, group_size=GROUP, calibration=CALIBRATION
        )
    assert {k: os.environ.get(k) for k in env} == env  # gptqmodel's import left no trace
    return out


@needs_quant
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_quantized_checkpoint_reloads_and_generates(tiny, quantized, method):
    _, tokenizer, _ = tiny
    summary = quantized[method]
    assert summary["method"] == method and not summary["skipped"]
    assert summary["calibration_used"] == (len(CALIBRATION) if method == "gptq" else 0)
    model = load_quantized(summary["out_dir"])
    assert type(model.model.layers[0].mlp.down_proj).__module__.startswith("gptqmodel")
    ids = torch.tensor([tokenizer("def f(")["input_ids"]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 4)


@needs_quant
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_size_accounting_is_exact(tiny, quantized, method):
    model, _, path = tiny
    stats = checkpoint_stats(quantized[method]["out_dir"])
    linears = quantized_linears(model)
    n_quantized = sum(m.weight.numel() for m in linears.values())
    assert stats["params"] == count_parameters(model)["total"] == checkpoint_stats(path)["params"]
    assert stats["quantized_params"] == n_quantized and stats["quantized_layers"] == len(linears)
    assert stats["packed_weight_bytes"] == n_quantized * 4 // 8
    overhead = sum(  # fp16 scales + 4-bit zeros per group and output, int32 g_idx per input
        (m.in_features // GROUP) * m.out_features * (2 + 0.5) + m.in_features * 4
        for m in linears.values()
    )
    assert stats["overhead_bytes"] == overhead
    assert stats["float_bytes"] == (stats["params"] - n_quantized) * 2  # stored as bfloat16
    assert quantized[method]["size_ratio"] < 0.35  # the embedding dominates this tiny model


@needs_quant
def test_rtn_checkpoint_holds_exactly_the_rtn_codes(tiny, quantized):
    model, tokenizer, _ = tiny
    directory = quantized["rtn"]["out_dir"]
    err = weight_error(model, directory)
    manual_err = manual_norm = 0.0
    for linear in quantized_linears(model).values():
        w_hat = dequantize(rtn_quantize_weight(linear.weight, bits=4, group_size=GROUP))
        manual_err += float((w_hat - linear.weight).pow(2).sum())
        manual_norm += float(linear.weight.pow(2).sum())
    assert err["relative"] == pytest.approx(manual_err / manual_norm, rel=1e-6)


@needs_quant
def test_gptq_output_error_is_below_rtn(tiny, quantized):
    model, tokenizer, _ = tiny
    kl = {}
    for method in ("gptq", "rtn"):
        q = load_quantized(quantized[method]["out_dir"])
        kl[method] = output_error(model, q, CALIBRATION, tokenizer)["kl"]
    werr = {m: weight_error(model, quantized[m]["out_dir"])["relative"] for m in kl}
    print(f"\ncalibration KL(fp || q): {kl}; relative weight error: {werr}")
    # GPTQ minimises layer outputs on these texts (seen: ~10x below RTN); RTN the weights.
    assert 0 < kl["gptq"] <= kl["rtn"]


def test_complete_result_is_skipped_and_stale_one_replaced(tiny, tmp_path):
    _, _, path = tiny
    directory = tmp_path / "rtn"
    first = quantize(path, directory, method="rtn", bits=4, group_size=GROUP)
    before = (directory / "model.safetensors").stat().st_mtime_ns
    again = quantize(path, directory, method="rtn", bits=4, group_size=GROUP)
    assert again["skipped"] and again["fingerprint"] == first["fingerprint"]
    assert (directory / "model.safetensors").stat().st_mtime_ns == before
    redone = quantize(path, directory, method="rtn", bits=8, group_size=GROUP)
    assert not redone["skipped"] and read_summary(directory)["bits"] == 8
    assert checkpoint_stats(directory)["packed_weight_bytes"] == redone["quantized_params"]
    assert [p.name for p in tmp_path.iterdir()] == ["rtn"]  # no staging leftovers


@needs_quant
def test_measure_reports_load_and_speed(quantized):
    result = measure(quantized["gptq"]["out_dir"], ["def f(", "class A:"], max_new_tokens=4)
    assert result["quantized"] and result["new_tokens"] == 8
    assert result["tokens_per_second"] > 0 and result["load_seconds"] > 0
    assert result["load_peak_rss_mb"] >= result["load_rss_mb"] - 1e-9
    assert [len(o) for o in result["outputs"]] == [4, 4]


def test_quantize_rejects_bad_settings_before_loading(tiny, tmp_path):
    _, _, path = tiny
    with pytest.raises(ValueError, match="bits=5"):
        quantize(path, tmp_path / "q", method="rtn", bits=5, group_size=GROUP)
    with pytest.raises(ValueError, match="calibration"):
        quantize(path, tmp_path / "q", method="gptq", bits=4, group_size=GROUP, calibration=["x"])
    assert not (tmp_path / "q").exists()


def test_importing_the_package_imports_neither_gptqmodel_nor_ray():
    code = "import sys, raykd.quantize; print('gptqmodel' in sys.modules, 'ray' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.split()[-2:] == ["False", "False"], result.stderr[-2000:]
