"""Token-level divergences by name, for configs (``word_kd.divergence: jsd`` and friends)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from torch import Tensor

from . import divergences as full
from . import topk

Objective = Callable[..., Tensor]

OBJECTIVES: dict[str, Objective] = {
    "forward_kl": full.forward_kl,
    "reverse_kl": full.reverse_kl,
    "jsd": full.jsd,
    "skew_forward_kl": full.skew_forward_kl,
    "skew_reverse_kl": full.skew_reverse_kl,
    "tvd": full.tvd,
    "cross_entropy": full.cross_entropy,
}
"""Full-logit divergences: ``fn(student_logits, teacher_logits, mask=None, **params) -> [...]``."""

TOPK_OBJECTIVES: dict[str, Objective] = {
    "forward_kl": topk.topk_forward_kl,
    "reverse_kl": topk.topk_reverse_kl,
    "jsd": topk.topk_jsd,
    "skew_forward_kl": topk.topk_skew_forward_kl,
    "skew_reverse_kl": topk.topk_skew_reverse_kl,
    "tvd": topk.topk_tvd,
    "cross_entropy": topk.topk_cross_entropy,
}
"""The same names against top-k targets:
``fn(student_logits, topk_logprobs, topk_indices, mask=None, **params) -> [...]``."""


def _table(topk_targets: bool) -> dict[str, Objective]:
    return TOPK_OBJECTIVES if topk_targets else OBJECTIVES


def get_divergence(name: str, *, topk_targets: bool = False) -> Objective:
    """The divergence registered as ``name`` (its top-k variant with ``topk_targets=True``).

    Raises:
        ValueError: unknown name; the message lists the valid names.
    """
    table = _table(topk_targets)
    if name not in table:
        raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(sorted(table))}")
    return table[name]


def objective_params(name: str, *, topk_targets: bool = False) -> dict[str, Any]:
    """Keyword parameters of objective ``name`` and their defaults."""
    sig = inspect.signature(get_divergence(name, topk_targets=topk_targets))
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def validate_params(
    name: str,
    params: Mapping[str, Any],
    *,
    topk_targets: bool = False,
    exclude: tuple[str, ...] = (),
) -> None:
    """Raise ``ValueError`` naming the first parameter that objective ``name`` does not take.

    ``exclude`` lists parameters the caller sets itself (e.g. ``temperature``), which are
    rejected here too.
    """
    valid = [p for p in objective_params(name, topk_targets=topk_targets) if p not in exclude]
    for key in params:
        if key not in valid:
            raise ValueError(
                f"objective {name!r} has no parameter {key!r}; "
                f"valid parameters: {', '.join(valid) or '(none)'}"
            )


def build_objective(name: str, *, topk_targets: bool = False, **params: Any) -> Objective:
    """``get_divergence(name)`` with keyword ``params`` bound, after checking their names.

    Example: ``build_objective("jsd", beta=0.5, temperature=2.0)(student, teacher, mask)``.

    Raises:
        ValueError: unknown objective, or a parameter it does not take (both named).
    """
    fn = get_divergence(name, topk_targets=topk_targets)
    validate_params(name, params, topk_targets=topk_targets)
    return partial(fn, **params)
