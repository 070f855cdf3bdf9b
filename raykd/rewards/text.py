"""Rule-based text rewards for GRPO: pure functions of one completion's text.

Each is ``fn(prompt, completion, reference, **params) -> float``: ``prompt`` is the raw user
prompt, ``completion`` the sampled response text, ``reference`` the dataset response.
Parameters are keyword-only with defaults, so a name alone is a complete reward and a config
can still tune it (``grpo.reward_kwargs``). :mod:`raykd.rewards.registry` turns them into batch
rewards.
"""

from __future__ import annotations

import re

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
