"""Turn :class:`TaskRecord` text into chat-formatted token ids (:class:`raykd.batch.Example`).

Layout of one example, for a ChatML template such as SmolLM2's::

    prompt_ids   = tok("<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n"
                       "<|im_start|>assistant\\n")
    response_ids = tok("{reference}") + [id("<|im_end|>")]

``prompt_ids + response_ids`` is exactly the tokenisation of the full templated
conversation up to and including the end-of-turn token; what the template writes after
that token (ChatML: a ``"\\n"``) is not part of the example, since generation stops at the
end-of-turn token and nothing after it is ever a target.  Ending every response with the
end-of-turn token teaches the student to stop.

Caveats: templates that render a conversation differently depending on
``add_generation_prompt`` (e.g. ones that insert reasoning tags) break the prefix property;
and special-token strings inside the reference text (``"<|im_end|>"`` written literally) are
tokenised as the special tokens themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from raykd.batch import Example
from raykd.data.records import TaskRecord

_SENTINEL = "RAYKD_END_OF_TURN_PROBE"


def _messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template applied to ``messages`` as a string."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if isinstance(text, list) and len(text) == 1:  # some versions batch a single conversation
        text = text[0]
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
    return text


def _ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of already-templated text (the template supplies any BOS itself)."""
    encoded = tokenizer(text, add_special_tokens=False)
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded.input_ids
    return [int(i) for i in ids]


def end_of_turn_id(tokenizer: Any) -> int:
    """Token that closes an assistant turn in ``tokenizer``'s chat template.

    Found by rendering a probe conversation and taking the first special token the
    template writes after the assistant's content (ChatML: ``<|im_end|>``); falls back to
    ``tokenizer.eos_token_id`` if the template writes none or cannot be rendered.
    """
    messages = _messages("hi", None) + [{"role": "assistant", "content": _SENTINEL}]
    try:
        text = _render(tokenizer, messages, add_generation_prompt=False)
    except Exception:  # no template, or one that rejects the probe: use EOS
        text = ""
    if _SENTINEL in text:
        suffix = text.split(_SENTINEL, 1)[1]
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        for tid in _ids(tokenizer, suffix) if suffix else []:
            if tid in special:
                return tid
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither an end-of-turn token in its template nor EOS")
    return int(tokenizer.eos_token_id)


def _prompt_ids_and_text(
    record: TaskRecord, tokenizer: Any, system_prompt: str | None
) -> tuple[list[int], str]:
    text = _render(tokenizer, _messages(record.prompt, system_prompt), add_generation_prompt=True)
    return _ids(tokenizer, text), text


def _encode(
    record: TaskRecord, tokenizer: Any, system_prompt: str | None, max_length: int, eot: int
) -> Example | None:
    prompt_ids, prompt_text = _prompt_ids_and_text(record, tokenizer, system_prompt)
    joint = _ids(tokenizer, prompt_text + record.reference)
    if joint[: len(prompt_ids)] == prompt_ids:
        # Tokenise the reference in context so the ids match the full conversation's.
        body = joint[len(prompt_ids) :]
    else:  # a merge across the boundary; fall back to the reference on its own
        body = _ids(tokenizer, record.reference)
    response_ids = body + [eot]
    if len(prompt_ids) + len(response_ids) > max_length:
        return None
    return Example(
        uid=record.uid,
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        prompt_text=record.prompt,
        reference=record.reference,
        meta=dict(record.meta),
    )


def encode_example(
    record: TaskRecord,
    tokenizer: Any,
    system_prompt: str | None = None,
    max_length: int = 256,
) -> Example | None:
    """Tokenise one record as a chat turn; ``None`` if prompt + response exceed ``max_length``.

    Args:
        record: The prompt/reference text.
        tokenizer: A Hugging Face tokenizer with a chat template.
        system_prompt: Optional system turn; ``None`` keeps the template's default (SmolLM2's
            template inserts its own system prompt when none is given).
        max_length: Longest ``len(prompt_ids) + len(response_ids)`` kept.

    Returns:
        An :class:`Example` whose ``prompt_ids`` end with the generation prompt and whose
        ``response_ids`` are the reference followed by the end-of-turn token.
        ``prompt_text`` holds the raw user prompt (not the templated string) and
        ``reference`` the raw reference.
    """
    return _encode(record, tokenizer, system_prompt, max_length, end_of_turn_id(tokenizer))


def encode_records(
    records: Iterable[TaskRecord],
    tokenizer: Any,
    max_length: int = 256,
    system_prompt: str | None = None,
) -> tuple[list[Example], int]:
    """Encode records in order, dropping over-long ones; returns ``(examples, num_dropped)``."""
    eot = end_of_turn_id(tokenizer)
    examples: list[Example] = []
    dropped = 0
    for record in records:
        example = _encode(record, tokenizer, system_prompt, max_length, eot)
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    return examples, dropped


def prompt_only(record: TaskRecord, tokenizer: Any, system_prompt: str | None = None) -> Example:
    """The generation input for ``record``: an :class:`Example` with empty ``response_ids``.

    ``prompt_ids`` are identical to those :func:`encode_example` produces, so generations
    are conditioned exactly as training was.  No length limit is applied.
    """
    prompt_ids, _ = _prompt_ids_and_text(record, tokenizer, system_prompt)
    return Example(
        uid=record.uid,
        prompt_ids=prompt_ids,
        response_ids=[],
        prompt_text=record.prompt,
        reference=record.reference,
        meta=dict(record.meta),
    )
