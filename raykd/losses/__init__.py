"""Distillation and RL losses: pure functions over tensors (no model, no Ray).

Conventions (see :mod:`raykd.batch`): position-wise inputs are already aligned --
``student_logits [..., V]`` at position ``i`` predicts target ``i``, and per-position tensors
(targets, mask, log-probs, advantages) have the same leading shape ``[...]``. Callers pass
``logits[:, :-1]`` views with ``[:, 1:]`` slices; nothing here shifts. Masks are float or bool,
1 = the position counts.

* :mod:`.divergences` -- token-level divergences from full teacher logits (chunked);
* :mod:`.topk` -- the same against cached top-k teacher log-probs plus a tail bucket;
* :mod:`.word_kd` -- Hinton's soft/hard mix; :mod:`.taid` -- TAID and its ``t`` schedule;
* :mod:`.policy_gradient` -- MiniLLM; :mod:`.grpo` -- GRPO and variants;
* :mod:`.hidden` -- intermediate-layer matching; :mod:`.multi_teacher` -- teacher ensembles;
* :mod:`.reduction` -- per-token → scalar reductions;
* :mod:`.registry` -- divergences by name (``OBJECTIVES``, ``get_divergence``,
  ``build_objective``).
"""

from ._rowwise import DEFAULT_CHUNK_SIZE
from .divergences import (
    cross_entropy,
    forward_kl,
    jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from .grpo import LOSS_TYPES, group_advantages, grpo_loss, kl_penalty
from .hidden import HiddenProjector, hidden_state_loss, uniform_layer_map
from .multi_teacher import ensemble_teacher_logprobs
from .policy_gradient import (
    clipped_policy_loss,
    discounted_returns,
    log_mixture,
    minillm_advantages,
    minillm_loss,
    minillm_rewards,
    single_step_reverse_kl,
    teacher_mixed_importance_weights,
    whiten,
)
from .reduction import REDUCTIONS, Reduction, masked_mean, masked_sum, reduce_loss
from .registry import (
    OBJECTIVES,
    TOPK_OBJECTIVES,
    build_objective,
    get_divergence,
    objective_params,
)
from .taid import TAIDSchedule, taid_loss
from .topk import (
    topk_bucket_logprobs,
    topk_cross_entropy,
    topk_forward_kl,
    topk_jsd,
    topk_reverse_kl,
    topk_skew_forward_kl,
    topk_skew_reverse_kl,
    topk_tvd,
)
from .word_kd import hinton_kd_loss

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "LOSS_TYPES",
    "OBJECTIVES",
    "REDUCTIONS",
    "TOPK_OBJECTIVES",
    "HiddenProjector",
    "Reduction",
    "TAIDSchedule",
    "build_objective",
    "clipped_policy_loss",
    "cross_entropy",
    "discounted_returns",
    "ensemble_teacher_logprobs",
    "forward_kl",
    "get_divergence",
    "group_advantages",
    "grpo_loss",
    "hidden_state_loss",
    "hinton_kd_loss",
    "jsd",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "log_mixture",
    "minillm_advantages",
    "minillm_loss",
    "minillm_rewards",
    "objective_params",
    "reduce_loss",
    "reverse_kl",
    "single_step_reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "taid_loss",
    "teacher_mixed_importance_weights",
    "topk_bucket_logprobs",
    "topk_cross_entropy",
    "topk_forward_kl",
    "topk_jsd",
    "topk_reverse_kl",
    "topk_skew_forward_kl",
    "topk_skew_reverse_kl",
    "topk_tvd",
    "tvd",
    "uniform_layer_map",
    "whiten",
]
