"""Teacher scoring role: log-probs of given tokens and top-k targets per position.

Nothing full-vocabulary leaves this actor. It returns either

* the aligned log-prob of each given token, ``[B, T]`` (reverse KL / MiniLLM rewards), or
* for each example, the top-k log-probs at temperature ``tau`` of its *target* positions
  only, ``[n_targets, k]`` values + indices (forward KL / JSD on the top-k support plus a
  tail bucket), which the controller caches so later epochs pay no teacher forward.
"""

from __future__ import annotations

import torch

from raykd.batch import SequenceBatch, token_logprobs
from raykd.roles.backends import Scorer


class HFTeacherScorer(Scorer):
    """Holds a frozen teacher (``backend='hf'``: transformers on CPU or GPU)."""

    def __init__(self, model_path: str, dtype: str = "float32", num_threads: int | None = None):
        from raykd.models import load_model

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(model_path, dtype=dtype).to(self.device).eval()

    def _logits(self, batch: SequenceBatch) -> torch.Tensor:
        return self.model(
            input_ids=batch.input_ids.to(self.device),
            attention_mask=batch.attention_mask.to(self.device),
            use_cache=False,
        ).logits

    @torch.no_grad()
    def token_logprobs(self, batch: SequenceBatch) -> torch.Tensor:
        """``log p_T(x_t | x_<t)`` per token, aligned ``[B, T]``, zero off ``loss_mask``."""
        lp = token_logprobs(self._logits(batch), batch.input_ids.to(self.device)).float().cpu()
        return lp * batch.loss_mask

    @torch.no_grad()
    def topk_targets(
        self, batch: SequenceBatch, k: int, temperature: float = 1.0
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per example: ``(logprobs [n, k] float32, indices [n, k] int32)`` of the top-k of
        ``log_softmax(z / tau)`` at the ``n`` positions where ``loss_mask`` is 1, in order."""
        logits = self._logits(batch)
        out = []
        for b in range(len(batch)):
            pos = batch.loss_mask[b].nonzero().flatten()
            if len(pos) == 0:
                out.append((torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int32)))
                continue
            # logits[t - 1] predicts token t
            z = logits[b, (pos - 1).to(self.device)].float() / temperature
            lp = torch.log_softmax(z, dim=-1)
            vals, idx = lp.topk(k, dim=-1)
            out.append((vals.cpu(), idx.to(torch.int32).cpu()))
        return out


TeacherScorer = HFTeacherScorer  # the default backend under its role name
