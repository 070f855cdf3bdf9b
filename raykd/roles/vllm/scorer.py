"""``teacher.backend: vllm`` — a frozen scorer running a vLLM engine.

Every row of a :class:`~raykd.batch.SequenceBatch` becomes one prefill-only request
(``max_tokens=1``, ``prompt_logprobs=k``): vLLM returns, for every position ``t >= 1`` of the
given tokens, the log-prob of token ``t`` given ``x_<t`` and the top-k of that distribution
(entry 0 is ``None``; the given token is an extra entry when outside the top-k; each entry has
its ``rank``). That is the ``hf`` scorer's alignment (``logits[t-1]`` predicts token ``t``).
Requests with prompt log-probs skip reading the prefix cache, so scores never come from
stale cache entries.

Temperature: prompt log-probs ignore ``SamplingParams.temperature``; ``tau != 1`` is applied
inside the engine by scaling the model's logits by ``1/tau`` for the call
(``logits_processor.scale``, through the worker extension), then restoring it.
``max_logprobs`` (``teacher.vllm.max_logprobs``, default ``max(teacher.top_k, 20)``) bounds k.
"""

from __future__ import annotations

import torch

from raykd.batch import SequenceBatch
from raykd.roles.backends import Scorer
from raykd.roles.vllm import engine as eng


def _row(batch: SequenceBatch, b: int) -> list[int]:
    n = int(batch.attention_mask[b].sum())
    return batch.input_ids[b, :n].tolist()


def topk_of(entry: dict, k: int) -> tuple[list[float], list[int]]:
    """The top-k ``(logprobs, token ids)`` of one ``prompt_logprobs`` entry, by rank (the given
    token's extra entry, ranked below k, is left out)."""
    ranked = sorted(
        ((lp.rank, lp.logprob, tok) for tok, lp in entry.items() if lp.rank is not None),
        key=lambda x: (x[0], -x[1]),
    )[:k]
    return [float(v) for _, v, _ in ranked], [int(t) for _, _, t in ranked]


class VLLMTeacherScorer(Scorer):
    """A frozen teacher in a vLLM engine."""

    @classmethod
    def config_kwargs(cls, section) -> dict:
        settings = eng.settings_of(section)
        top_k = int(getattr(section, "top_k", 0) or 0)
        if settings["max_logprobs"] is None:
            settings["max_logprobs"] = max(top_k, 20)
        return {"engine": settings}

    @classmethod
    def runtime_env(cls, section, given: dict | None = None) -> dict:
        return eng.actor_runtime_env(section, given)

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        num_threads: int | None = None,
        engine: dict | None = None,
    ):
        self.settings = {**eng.DEFAULTS, **(engine or {})}
        self.max_logprobs = int(self.settings["max_logprobs"] or 20)
        self.llm = eng.build_engine(
            model_path, dtype, self.settings, num_threads, max_logprobs=self.max_logprobs
        )
        self.temperature = 1.0

    def torch_threads(self) -> int:
        return torch.get_num_threads()

    def _prompt_logprobs(self, batch: SequenceBatch, k: int, temperature: float = 1.0):
        from vllm import SamplingParams

        if k > self.max_logprobs:
            raise ValueError(
                f"top-{k} needs teacher.vllm.max_logprobs >= {k} (it is {self.max_logprobs})"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=k, detokenize=False)
        rows = [eng.tokens_prompt(_row(batch, b)) for b in range(len(batch))]
        if temperature != self.temperature:
            self.llm.collective_rpc("raykd_scale_logits", args=(1.0 / temperature,))
            self.temperature = temperature
        try:
            outputs = self.llm.generate(rows, params, use_tqdm=False)
        finally:
            if self.temperature != 1.0:
                self.llm.collective_rpc("raykd_scale_logits", args=(1.0,))
                self.temperature = 1.0
        return [out.prompt_logprobs for out in outputs]

    @torch.no_grad()
    def token_logprobs(self, batch: SequenceBatch) -> torch.Tensor:
        """``log p_T(x_t | x_<t)`` per token, aligned ``[B, T]``, zero off ``loss_mask``."""
        out = torch.zeros_like(batch.loss_mask)
        for b, entries in enumerate(self._prompt_logprobs(batch, 0)):
            ids = batch.input_ids[b]
            for t in range(1, len(entries)):
                out[b, t] = entries[t][int(ids[t])].logprob
        return out * batch.loss_mask

    @torch.no_grad()
    def topk_targets(
        self, batch: SequenceBatch, k: int, temperature: float = 1.0
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per example: ``(logprobs [n, k] float32, indices [n, k] int32)`` of the top-k of
        ``log_softmax(z / tau)`` at the ``n`` positions where ``loss_mask`` is 1, in order."""
        result = []
        for b, entries in enumerate(self._prompt_logprobs(batch, k, temperature)):
            pos = batch.loss_mask[b].nonzero().flatten().tolist()
            vals = torch.zeros(len(pos), k)
            idx = torch.zeros(len(pos), k, dtype=torch.int32)
            for i, t in enumerate(pos):
                v, ids = topk_of(entries[t], k)
                vals[i, : len(v)] = torch.tensor(v)
                idx[i, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
            result.append((vals, idx))
        return result
