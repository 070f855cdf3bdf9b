"""raykd's 4-bit checkpoints (GPTQ through GPTQModel, and the RTN baseline in the same
packed layout) load in vLLM's GPTQ path on CPU and score like transformers does.

The reference is the same packed checkpoint in transformers (GPTQModel's kernels, float32
activations); vLLM computes in bfloat16 (its GPTQ kernels take no float32), so the two
agree to bfloat16 rounding -- far closer than either is to the float model the codes came
from, which is what a misread zero point or group scale would break.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from raykd.batch import pad_sequences
from raykd.quantize import quantize
from raykd.roles.factory import scorer_group
from raykd.roles.teacher import HFTeacherScorer

from .test_vllm import _cfg, _prompts, build_vllm_tiny_model, require_vllm

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("gptqmodel") is None, reason="needs the 'quant' extra"
    ),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    require_vllm()
    tmp = tmp_path_factory.mktemp("vllm_quantized")
    float_dir = build_vllm_tiny_model(tmp / "float")
    calibration = [p + list(range(40, 72)) for p in _prompts()]
    out = {"float": float_dir}
    for method in ("gptq", "rtn"):
        # symmetric 4-bit: the codes vLLM's GPTQ path (and its CPU kernel) loads
        quantize(float_dir, tmp / method, method=method, bits=4, group_size=32, sym=True,
                 calibration=calibration)  # fmt: skip
        out[method] = str(tmp / method)
    return out


def _batch():
    prompts = _prompts(3)
    seqs = [p + [40 + i, 41, 42, 43, 44, 2] for i, p in enumerate(prompts)]
    masks = [[0.0] * len(p) + [1.0] * 6 for p in prompts]
    return pad_sequences(seqs, masks, 0, ["a", "b", "c"])


def _mean_abs(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((a - b).abs() * mask).sum() / mask.sum())


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_vllm_scores_the_packed_checkpoint_like_transformers(ray_node, checkpoints, method):
    batch = _batch()
    mask = batch.loss_mask
    packed = checkpoints[method]
    # transformers on the packed checkpoint, and on the float model it was quantized from
    want = HFTeacherScorer(packed, "float32", 1).token_logprobs(batch)
    float_lp = HFTeacherScorer(checkpoints["float"], "float32", 1).token_logprobs(batch)
    # the scorer asks for float32: the engine computes the packed model in bfloat16
    with scorer_group(_cfg(packed), packed) as scorers:
        got = scorers.call("token_logprobs", batch)[0]
    assert got.shape == want.shape and bool((got * mask).lt(0).any())
    quant_error = _mean_abs(want, float_lp, mask)  # what 4 bits changed
    engine_error = _mean_abs(got, want, mask)  # vLLM vs transformers on the same codes
    assert quant_error > 1e-3, quant_error  # the codes really differ from the float weights
    assert engine_error < 0.25 * quant_error and engine_error < 0.05, (engine_error, quant_error)
