"""Typed data that crosses role boundaries.

Everything here is small: token ids and per-token floats. Full-vocabulary logits never
leave the process that computed them (a batch of 8x512 positions over a 150k vocabulary
is gigabytes); teachers send either the log-prob of each given token or the top-k
log-probs per position.

Alignment convention (used by every role, loss and algorithm):

* ``input_ids[b, t]`` is token ``t`` of sequence ``b``; sequences are right-padded.
* A per-token tensor ``x[b, t]`` (log-prob, reward, mask) refers to *predicting token t*
  from the prefix ``input_ids[b, :t]``.  Column 0 is therefore never a target and every
  mask has ``mask[:, 0] == 0``.
* ``logits[:, t]`` of a causal LM predicts token ``t + 1``.  Losses never copy logits
  to realign them: callers pass the view ``logits[:, :-1]`` together with per-token
  tensors sliced ``[:, 1:]`` (see :func:`token_logprobs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch


@dataclass
class Example:
    """One tokenised training/eval example: a chat prompt and its reference response."""

    uid: str
    prompt_ids: list[int]
    response_ids: list[int]
    prompt_text: str = ""
    reference: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class SequenceBatch:
    """Right-padded token sequences with a mask of the tokens a loss trains on."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long (1 = real token)
    loss_mask: torch.Tensor  # [B, T] float (1 = response token that is a target)
    uids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: slice | list[int]) -> SequenceBatch:
        return _select(self, index)


@dataclass
class TopKTargets:
    """Teacher top-k log-probs per position, at the temperature they were computed at.

    ``logprobs[b, t, j]`` is ``log p_T^tau(indices[b, t, j] | prefix_<t)``; the mass the top-k
    leaves out is ``1 - logprobs[b, t].exp().sum()`` (the "tail bucket").
    """

    logprobs: torch.Tensor  # [B, T, k] float
    indices: torch.Tensor  # [B, T, k] long
    temperature: float = 1.0

    def select(self, index: slice | list[int]) -> TopKTargets:
        return _select(self, index)


@dataclass
class Rollout:
    """Sampled continuations of prompts, with the sampler's log-prob of each token."""

    batch: SequenceBatch  # prompt + response; loss_mask marks the sampled response tokens
    logprobs: torch.Tensor  # [B, T] log q_old(y_t) at temperature 1 (0 off the mask)
    prompt_lengths: list[int] = field(default_factory=list)
    response_texts: list[str] = field(default_factory=list)
    # [B, T] log p_T(y_t), when the sampler ran the teacher too (teacher-mixed sampling)
    teacher_logprobs: torch.Tensor | None = None
    # per row: the response ended on a stop token (end of turn), not at max_new_tokens
    stopped: list[bool] = field(default_factory=list)


def token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """Aligned ``log softmax(logits)[t-1, input_ids[t]]`` per token, ``[B, T]``, column 0 zero.

    Computed position-chunk by chunk so that no full ``[B, T, V]`` log-softmax copy is held.
    """
    bsz, seqlen, _ = logits.shape
    out = logits.new_zeros(bsz, seqlen)
    for start in range(1, seqlen, chunk):
        stop = min(start + chunk, seqlen)
        lg = logits[:, start - 1 : stop - 1].float()
        tgt = input_ids[:, start:stop].unsqueeze(-1)
        out[:, start:stop] = (lg.gather(-1, tgt).squeeze(-1) - torch.logsumexp(lg, dim=-1)).to(
            out.dtype
        )
    return out


def pad_sequences(
    seqs: list[list[int]], masks: list[list[float]], pad_id: int, uids: list[str] | None = None
) -> SequenceBatch:
    """Right-pad token lists into a :class:`SequenceBatch` (``masks`` aligned with tokens)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
        loss[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    loss[:, 0] = 0.0
    return SequenceBatch(ids, attn, loss, list(uids or []))


def examples_to_batch(examples: list[Example], pad_id: int) -> SequenceBatch:
    """Prompt + reference response, loss only on the response tokens."""
    seqs = [e.prompt_ids + e.response_ids for e in examples]
    masks = [[0.0] * len(e.prompt_ids) + [1.0] * len(e.response_ids) for e in examples]
    return pad_sequences(seqs, masks, pad_id, [e.uid for e in examples])


def _select(obj, index):
    kwargs = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            kwargs[f.name] = value[index]
        elif isinstance(value, list) and value:
            kwargs[f.name] = value[index] if isinstance(index, slice) else [value[i] for i in index]
        else:
            kwargs[f.name] = value
    return type(obj)(**kwargs)


def pad_rows(rows, like: torch.Tensor) -> torch.Tensor:
    """Per-token rows (lists or 1-D tensors, each starting at column 0) into a zero-padded
    tensor shaped and typed like ``like`` (e.g. a batch's ``[B, T]`` loss mask)."""
    out = torch.zeros_like(like)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=out.dtype)
    return out


def scatter_topk(
    per_example: list[tuple[torch.Tensor, torch.Tensor]],
    loss_mask: torch.Tensor,
    k: int,
    names: list[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example top-k targets (``[n_b, k]`` log-probs and token ids, one row per response
    position of example ``b``) scattered into dense ``[B, T, k]`` tensors at the positions of
    ``loss_mask``. Other positions hold a valid filler distribution (``log(0.5/k)`` on ids
    ``0..k-1``) that no masked loss reads. ``names`` label errors (e.g. example uids)."""
    bsz, seqlen = loss_mask.shape
    lp = torch.full((bsz, seqlen, k), math.log(0.5 / k))
    idx = torch.arange(k).expand(bsz, seqlen, k).clone()
    for b, (vals, ids) in enumerate(per_example):
        pos = loss_mask[b].nonzero().flatten()
        if len(pos) != vals.shape[0]:
            name = names[b] if names else f"row {b}"
            raise ValueError(
                f"example {name}: {len(pos)} response positions but {vals.shape[0]} target rows"
            )
        lp[b, pos] = vals.float()
        idx[b, pos] = ids.long()
    return lp, idx
