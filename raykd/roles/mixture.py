"""Teacher-mixed sampling (MiniLLM): draw each response token from ``p̃ = α·p_T + (1−α)·q_S``.

``transformers.generate`` samples from one model; the mixture needs both models' next-token
distributions at every step, so this is a small decoding loop of its own: one prefill per
model, then one cached single-token forward per model and step. It also returns what the
controller needs without another pass: ``log q_S(y_t)`` (the old policy's log-prob of the
sampled token) and ``log p_T(y_t)`` (the teacher's, i.e. the reward's first term), both at
temperature 1, so that the importance weight ``w_t = q_S(y_t) / p̃(y_t)`` is exact for the
distribution actually sampled.

Prompts arrive left-padded; position ids are counted from each row's first real token, as
``generate`` does, so cached decoding gives the same log-probs as a full forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from raykd.losses import log_mixture


def _step(model, ids: Tensor, attn: Tensor, pos: Tensor, cache) -> tuple[Tensor, object]:
    out = model(
        input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True
    )
    return out.logits[:, -1], out.past_key_values


@torch.no_grad()
def sample_from_mixture(
    student,
    teacher,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    alpha: float,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample up to ``max_new_tokens`` tokens per left-padded prompt from the mixture.

    Returns ``(tokens, student_logprobs, teacher_logprobs)``, each ``[B, N]``: the sampled
    tokens (``pad_id`` after a row's stop token) and ``log q_S(y_t)``, ``log p_T(y_t)`` of each
    (0 after the stop token). ``N ≤ max_new_tokens``: decoding ends when every row stopped.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mixture weight alpha must be in [0, 1], got {alpha}")
    device = input_ids.device
    attn = attention_mask.long()
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    s_logits, s_cache = _step(student, input_ids, attn, pos, None)
    t_logits, t_cache = _step(teacher, input_ids, attn, pos, None)
    next_pos = pos[:, -1:] + 1
    stops = torch.tensor(sorted(stop_ids), device=device)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    tokens, s_lps, t_lps = [], [], []
    for _ in range(max_new_tokens):
        log_q = torch.log_softmax(s_logits.float(), -1)
        log_p = torch.log_softmax(t_logits.float(), -1)
        log_mix = log_mixture(log_p, log_q, alpha)
        tok = torch.multinomial(log_mix.exp(), 1, generator=generator).squeeze(-1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        live = (~done).float()
        s_lps.append(log_q.gather(-1, tok[:, None])[:, 0] * live)
        t_lps.append(log_p.gather(-1, tok[:, None])[:, 0] * live)
        tokens.append(tok)
        done = done | torch.isin(tok, stops)
        if bool(done.all()):
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)
        s_logits, s_cache = _step(student, tok[:, None], attn, next_pos, s_cache)
        t_logits, t_cache = _step(teacher, tok[:, None], attn, next_pos, t_cache)
        next_pos = next_pos + 1
    return torch.stack(tokens, 1), torch.stack(s_lps, 1), torch.stack(t_lps, 1)
