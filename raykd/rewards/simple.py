"""Rule-based rewards for GRPO: pure functions of text, registered by name.

Every reward is ``fn(prompt, completion, reference, **params) -> float``: ``prompt`` is the raw
user prompt, ``completion`` the sampled response text, ``reference`` the dataset response.
Parameters are keyword-only with defaults, so a name alone is a complete reward and a config
can still tune it (``grpo.reward_kwargs``). :func:`combine` builds the weighted sum of named
rewards that the GRPO loop calls once per completion.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

RewardFn = Callable[..., float]

_FORMAT = re.compile(
    r"\s*<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>\s*",
    re.DOTALL,
)
_STEP_MARKERS = re.compile(
    r"\bStep\s*\d+\b"
    r"|^[ \t]*\d+[.)][ \t]"
    r"|\b(?:First|Second|Third|Next|Then|Finally),",
    re.MULTILINE,
)


def format_reward(prompt: str, completion: str, reference: str) -> float:
    """1.0 if the completion is ``<think>…</think>`` followed by ``<answer>…</answer>``.

    Whitespace may surround and separate the two blocks; nothing else may. Neither block may
    contain another opening or closing tag of its own kind. Otherwise 0.0.
    """
    return 1.0 if _FORMAT.fullmatch(completion) else 0.0


def reasoning_steps_reward(
    prompt: str, completion: str, reference: str, *, max_steps: int = 3
) -> float:
    """Step markers in the completion, ``min(count, max_steps) / max_steps`` in ``[0, 1]``.

    Markers: ``Step 1`` (any number), a line starting with a number and ``.`` or ``)``
    (``1. ``, ``2) ``), and the openers ``First,`` ``Second,`` ``Third,`` ``Next,`` ``Then,``
    ``Finally,``.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    return min(len(_STEP_MARKERS.findall(completion)), max_steps) / max_steps


def length_reward(
    prompt: str, completion: str, reference: str, *, target: int = 200, width: int | None = None
) -> float:
    """Triangular reward on the completion's length in characters ``n``:

    ``max(0, 1 − |n − target| / width)`` -- 1.0 at ``target``, falling linearly to 0.0 at
    ``target ± width`` (``width`` defaults to ``target``).
    """
    width = target if width is None else width
    if target < 0 or width <= 0:
        raise ValueError(f"length reward needs target >= 0 and width > 0, got {target}, {width}")
    return max(0.0, 1.0 - abs(len(completion) - target) / width)


def reference_overlap_reward(prompt: str, completion: str, reference: str) -> float:
    """Rouge-L F1 of the completion against the reference, in ``[0, 1]``."""
    from raykd.evaluate.metrics import rouge_l_scores

    return rouge_l_scores([completion], [reference])[0] / 100.0


REWARDS: dict[str, RewardFn] = {
    "format": format_reward,
    "reasoning_steps": reasoning_steps_reward,
    "length": length_reward,
    "reference_overlap": reference_overlap_reward,
}


def get_reward(name: str, **params: Any) -> RewardFn:
    """The reward registered as ``name`` with ``params`` bound; checks both eagerly."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known: {sorted(REWARDS)}")
    fn = REWARDS[name]
    try:
        inspect.signature(fn).bind("", "", "", **params)
    except TypeError as err:
        raise ValueError(f"reward {name!r}: bad parameters {params}: {err}") from None
    return partial(fn, **params) if params else fn


def combine(
    names: Sequence[str],
    weights: Sequence[float] | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable[[str, str, str], float]:
    """``reward(prompt, completion, reference) = Σ_i weights[i] · REWARDS[names[i]](...)``.

    ``weights`` default to 1.0 each; ``params`` maps a reward name to its keyword parameters.
    Unknown names, unused ``params`` entries and a weight count that does not match raise
    :class:`ValueError`.
    """
    names = list(names)
    if not names:
        raise ValueError(f"no rewards named; known: {sorted(REWARDS)}")
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} reward weights for {len(names)} rewards {names}")
    params = {k: dict(v) for k, v in (params or {}).items()}
    unused = sorted(set(params) - set(names))
    if unused:
        raise ValueError(f"parameters given for rewards {unused} that are not in {names}")
    fns = [get_reward(n, **params.get(n, {})) for n in names]

    def reward(prompt: str, completion: str, reference: str) -> float:
        return sum(w * fn(prompt, completion, reference) for w, fn in zip(weights, fns))

    return reward
