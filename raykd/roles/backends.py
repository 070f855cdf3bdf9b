"""Sampler and scorer interfaces, and the registry of their backends.

A **sampler** (rollout worker) continues prompts with the policy being trained and reports the
temperature-1 log-prob of every sampled token; it takes new weights as ``(name, tensor)``
pairs. A **scorer** (teacher) returns, for given sequences, the log-prob of each given token
and the top-k log-probs at the response positions. Learners recompute old log-probs
themselves, so a sampler may be approximate (the sampler/learner mismatch is logged).

Backends are registered by name as ``"module:Class"`` strings, imported only when a group is
built: a backend whose engine lives in another Python environment (vLLM, through the role's
``runtime_env``) is never imported by the driver. ``rollout.backend`` / ``teacher.backend``
name them; an unknown name fails at config load with the valid ones.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from raykd.batch import Rollout, SequenceBatch


@dataclass(frozen=True)
class SamplerCapabilities:
    """What a sampler backend can do (checked before a stage builds its roles).

    ``teacher_mixing``: can sample MiniLLM's mixture ``a p_T + (1 - a) q_S`` (holds the
    teacher next to the policy). ``weight_sync``: the weight-sync strategies it accepts
    (names in :data:`raykd.roles.weight_sync.STRATEGIES`). ``exact_logprobs``: its
    ``log q(y_t)`` come from the learners' own model code, so once they have matched the
    learners' (same weights, same dtype) an algorithm may use them as the old policy's instead
    of recomputing them.
    """

    teacher_mixing: bool = False
    weight_sync: tuple[str, ...] = ("object_store",)
    exact_logprobs: bool = False


class Sampler(abc.ABC):
    """A rollout worker: one copy of the policy (or any model to decode from)."""

    capabilities: ClassVar[SamplerCapabilities] = SamplerCapabilities()

    @classmethod
    def config_kwargs(cls, section) -> dict:
        """Extra constructor keyword arguments from the role's config section (``rollout``),
        e.g. engine settings; none by default."""
        return {}

    @classmethod
    def runtime_env(cls, section, given: dict | None = None) -> dict | None:
        """The Ray ``runtime_env`` of this backend's actors: by default the section's own
        (``given``); a backend with its own environment merges ``given`` over its defaults."""
        return given or None

    @abc.abstractmethod
    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        greedy: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        uids: list[str] | None = None,
        mix_alpha: float = 0.0,
    ) -> Rollout:
        """Continue each prompt. Returns prompt+response sequences (right-padded), a loss mask
        on the response tokens (up to and including the stop token), the response texts and
        ``log q(y_t)`` of each response token at temperature 1 under the current weights."""

    def generate_texts(self, prompts: list[list[int]], **kwargs) -> list[str]:
        """Only the response texts (evaluation)."""
        return self.generate(prompts, **kwargs).response_texts

    def generate_answers(self, prompts: list[list[int]], **kwargs) -> list[tuple[str, bool]]:
        """``(response text, stopped)`` per prompt: ``stopped`` when the response ended on a
        stop token (end of turn) rather than at ``max_new_tokens`` (evaluation)."""
        out = self.generate(prompts, **kwargs)
        return list(zip(out.response_texts, out.stopped, strict=True))

    @abc.abstractmethod
    def update_weights(
        self,
        named_tensors: Sequence[tuple[str, torch.Tensor]],
        finished: bool = True,
        borrow: bool = False,
    ) -> int:
        """Load one bucket of new weights; ``finished`` marks the update's last bucket, after
        which every weight must have been replaced exactly once (tied weights are sent once).
        ``borrow``: buffers only the sender writes (the object store's read-only ones, or the
        shared weight file the learner rewrites at each ``shared_memory`` sync), which a
        backend may keep as its weights instead of copying them (or ignore).
        Returns the number of tensors loaded by this call."""


class Scorer(abc.ABC):
    """A frozen model that scores given sequences (the teacher, or GRPO's reference)."""

    @classmethod
    def config_kwargs(cls, section) -> dict:
        """Extra constructor keyword arguments from the role's config section (``teacher``)."""
        return {}

    @classmethod
    def runtime_env(cls, section, given: dict | None = None) -> dict | None:
        """The Ray ``runtime_env`` of this backend's actors (see :meth:`Sampler.runtime_env`)."""
        return given or None

    @abc.abstractmethod
    def token_logprobs(self, batch: SequenceBatch) -> torch.Tensor:
        """``log p(x_t | x_<t)`` of each given token, aligned ``[B, T]``, zero off the loss
        mask."""

    @abc.abstractmethod
    def topk_targets(
        self, batch: SequenceBatch, k: int, temperature: float = 1.0
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per example: ``(logprobs [n, k], indices [n, k] int32)``, the top-k of
        ``log_softmax(z / tau)`` at the ``n`` positions where the loss mask is 1, in order."""


SAMPLERS: dict[str, str] = {
    "hf": "raykd.roles.rollout:HFRolloutWorker",
    "vllm": "raykd.roles.vllm.sampler:VLLMRolloutWorker",
}
SCORERS: dict[str, str] = {
    "hf": "raykd.roles.teacher:HFTeacherScorer",
    "vllm": "raykd.roles.vllm.scorer:VLLMTeacherScorer",
}


def merged_runtime_env(base: dict, given: dict | None) -> dict:
    """``given`` (the role's ``runtime_env`` from config) over a backend's ``base``: its keys
    win, except ``env_vars``, which are merged (``given``'s win)."""
    given = dict(given or {})
    env = {**base.get("env_vars", {}), **given.pop("env_vars", {})}
    return {**base, **given, **({"env_vars": env} if env else {})}


def _load(table: dict[str, str], kind: str, name: str) -> type:
    if name not in table:
        raise ValueError(f"unknown {kind} backend {name!r}; valid: {', '.join(sorted(table))}")
    module, _, cls = table[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def sampler_class(name: str) -> type[Sampler]:
    return _load(SAMPLERS, "sampler", name)


def weight_sync_name(section) -> str:
    """``rollout.weight_sync``, with ``auto`` resolved to the backend's preferred strategy
    (the first of its ``capabilities.weight_sync``: ``shared_memory`` for ``hf``)."""
    if section.weight_sync != "auto":
        return section.weight_sync
    return sampler_class(section.backend).capabilities.weight_sync[0]


def scorer_class(name: str) -> type[Scorer]:
    return _load(SCORERS, "scorer", name)
