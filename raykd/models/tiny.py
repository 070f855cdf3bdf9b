"""Tiny, fully offline models and tokenizers for tests and smoke runs.

Nothing here touches the network or the disk: the tokenizer is a byte-level BPE with no
merges (every UTF-8 byte is one token, so any text round-trips exactly) plus the three
ChatML special tokens SmolLM2 uses, and models are random Llamas built from a config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

__all__ = [
    "CHATML_TEMPLATE",
    "TINY_VOCAB_SIZE",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "from_config",
    "tiny_llama_config",
]

#: ChatML, the template SmolLM2-Instruct ships (without its default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

#: Vocabulary of :func:`build_tiny_tokenizer`: 3 special tokens + 256 bytes.
TINY_VOCAB_SIZE = len(_SPECIAL_TOKENS) + 256


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 259-token byte-level tokenizer with SmolLM2's special tokens and ChatML template.

    Ids 0, 1, 2 are ``<|endoftext|>`` (unk/pad), ``<|im_start|>`` (bos) and ``<|im_end|>``
    (eos), as in SmolLM2; ids 3..258 are the 256 bytes.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in _SPECIAL_TOKENS]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        chat_template=CHATML_TEMPLATE,
    )


def tiny_llama_config(
    vocab_size: int = TINY_VOCAB_SIZE,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = True,
    **overrides: Any,
) -> LlamaConfig:
    """A small Llama config (GQA, tied embeddings, SmolLM2-like special token ids).

    ``intermediate_size`` defaults to ``2 * hidden_size``; ``overrides`` are passed to
    :class:`~transformers.LlamaConfig` verbatim (e.g. ``initializer_range``).
    """
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size={hidden_size} must divide by num_heads={num_heads}, "
            f"which must divide by num_kv_heads={num_kv_heads}"
        )
    params: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "intermediate_size": intermediate_size or 2 * hidden_size,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings,
        "unk_token_id": 0,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    params.update(overrides)
    return LlamaConfig(**params)


def _seeded_from_config(config: Any, seed: int | None) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_config`` under a private RNG when ``seed`` is given."""
    if seed is None:
        model = AutoModelForCausalLM.from_config(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def build_tiny_model(
    vocab: int | PreTrainedTokenizerBase = TINY_VOCAB_SIZE,
    seed: int = 0,
    **config_kwargs: Any,
) -> LlamaForCausalLM:
    """A random tiny Llama (eval mode), deterministic in ``seed``; the global RNG is untouched.

    ``vocab`` is a vocabulary size or a tokenizer, whose length and special token ids are
    used. ``config_kwargs`` go to :func:`tiny_llama_config`.
    """
    if isinstance(vocab, int):
        config = tiny_llama_config(vocab_size=vocab, **config_kwargs)
    else:
        token_ids = {
            "pad_token_id": vocab.pad_token_id,
            "bos_token_id": vocab.bos_token_id,
            "eos_token_id": vocab.eos_token_id,
            "unk_token_id": vocab.unk_token_id,
        }
        token_ids.update(config_kwargs)
        config = tiny_llama_config(vocab_size=len(vocab), **token_ids)
    model = _seeded_from_config(config, seed)
    assert isinstance(model, LlamaForCausalLM)
    return model


def from_config(config: Mapping[str, Any], seed: int | None = None) -> PreTrainedModel:
    """Build a randomly initialised causal LM of any architecture from a config dict.

    ``config`` must name its ``model_type`` (``"llama"``, ``"qwen3"``, ...); every other key
    is a config attribute. Unspecified attributes take the architecture's defaults, which
    are usually *full-size* models, so give at least the sizes.
    """
    params = dict(config)
    model_type = params.pop("model_type", None)
    if not model_type:
        raise ValueError(
            f"model config needs a 'model_type' (e.g. 'llama'); got keys {sorted(params)}"
        )
    return _seeded_from_config(AutoConfig.for_model(model_type, **params), seed)
