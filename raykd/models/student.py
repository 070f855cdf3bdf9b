"""Deriving a student from a teacher by keeping a subset of its decoder layers.

Layer indices are 0-based over the ``n`` decoder layers. Every rule returns sorted, unique
indices. The rules (``k`` = number of layers kept, default ``n // 2 + 1``):

``every_other``
    ``k`` layers spread as evenly as possible over the stack, always including the first and
    the last: layer ``i`` of the student is teacher layer ``round_half_up(i * (n-1) / (k-1))``.
    With the default ``k`` and odd ``n`` this is exactly ``0, 2, 4, ..., n-1``; for even
    ``n`` the one step of 1 falls in the middle (``n=6`` gives ``0, 2, 3, 5``).
``first_last``
    The first ``ceil(k/2)`` and the last ``floor(k/2)`` layers: one contiguous middle block
    of ``n - k`` layers is dropped.
``angular``
    Drops the contiguous block of ``b = n - k`` layers whose output is most similar to its
    input (ShortGPT; Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
    Layers"). With ``x_l`` the residual stream entering layer ``l`` (``x_n`` leaving the
    last layer), the block starting at ``l`` has distance ``d_l = mean_t arccos(cos(x_l,
    x_{l+b})) / pi`` over calibration tokens ``t`` (:func:`angular_distances`). The block
    with the smallest ``d_l`` is dropped, among blocks that keep layer 0 and the last layer
    (``1 <= l <= n - b - 1``); ties go to the earliest block.
``explicit``
    The given indices, which must be sorted, unique and in ``[0, n)``.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from raykd.models.loading import ensure_pad_token, skip_weight_init

__all__ = [
    "DEFAULT_CALIBRATION_PROMPTS",
    "RULES",
    "angular_distances",
    "decoder_layers",
    "derive_student",
    "select_layers",
    "student_from_teacher",
]

RULES = ("every_other", "first_last", "angular", "explicit")

#: Short, varied prompts for the angular rule when no task data is given.
DEFAULT_CALIBRATION_PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers greater than ten.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet.",
    "How do I sort a dictionary by value in Python?",
)

# Config lists holding layer *indices* (not one entry per layer): remapped, not sliced.
_INDEX_LIST_KEYS = ("mlp_only_layers",)


def _check_indices(layers: Sequence[int], num_layers: int) -> list[int]:
    """Validate sorted, unique, in-range layer indices; ValueError names the first bad one."""
    if len(layers) == 0:
        raise ValueError("at least one layer index is needed")
    checked: list[int] = []
    for position, index in enumerate(layers):
        try:
            if isinstance(index, bool):
                raise TypeError
            index = operator.index(index)
        except TypeError:
            raise ValueError(
                f"layer index {index!r} at position {position} is not an integer"
            ) from None
        if not 0 <= index < num_layers:
            raise ValueError(
                f"layer index {index} at position {position} is out of range [0, {num_layers})"
            )
        if checked and index <= checked[-1]:
            raise ValueError(
                f"layer index {index} at position {position} is not greater than the previous "
                f"index {checked[-1]}: layers must be sorted and unique"
            )
        checked.append(index)
    return checked


def select_layers(
    num_layers: int,
    rule: str,
    keep: int | None = None,
    layers: Sequence[int] | None = None,
    distances: Sequence[float] | None = None,
) -> list[int]:
    """The teacher layers a student keeps, by ``rule`` (see the module docstring).

    ``keep`` is the number of layers to keep (default ``num_layers // 2 + 1``; for
    ``explicit`` it must match ``len(layers)`` if given). ``distances`` is required by
    ``angular``: the output of :func:`angular_distances` with ``block_size = num_layers -
    keep``, i.e. ``keep + 1`` values.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    if rule == "explicit":
        if layers is None:
            raise ValueError("rule 'explicit' needs `layers`")
        chosen = _check_indices(list(layers), num_layers)
        if keep is not None and keep != len(chosen):
            raise ValueError(f"keep={keep} does not match the {len(chosen)} explicit layers")
        return chosen
    if rule not in RULES:
        raise ValueError(f"unknown layer rule {rule!r}; choose one of {', '.join(RULES)}")
    keep = num_layers // 2 + 1 if keep is None else keep
    if not 1 <= keep <= num_layers:
        raise ValueError(f"keep={keep} must be in [1, {num_layers}]")
    if keep == num_layers:
        return list(range(num_layers))
    if keep < 2:
        raise ValueError(f"rule {rule!r} keeps the first and last layer, so keep must be >= 2")
    if rule == "every_other":
        step = (num_layers - 1) / (keep - 1)  # >= 1, so rounding keeps indices distinct
        return [math.floor(i * step + 0.5) for i in range(keep)]
    if rule == "first_last":
        head = (keep + 1) // 2
        return list(range(head)) + list(range(num_layers - (keep - head), num_layers))
    # angular
    block = num_layers - keep
    if distances is None:
        raise ValueError("rule 'angular' needs `distances` (see angular_distances)")
    if len(distances) != num_layers - block + 1:
        raise ValueError(
            f"angular: expected {num_layers - block + 1} distances for block size {block} "
            f"over {num_layers} layers, got {len(distances)}"
        )
    candidates = [
        (d if math.isfinite(d) else math.inf, start)
        for start, d in enumerate(distances)
        if 1 <= start <= num_layers - block - 1
    ]
    best, start = min(candidates)
    if not math.isfinite(best):
        raise ValueError(f"angular: no finite distance among the candidate blocks: {distances}")
    return [i for i in range(num_layers) if not start <= i < start + block]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer stack of a causal LM and its qualified name (``model.layers`` for Llama)."""
    config = getattr(model, "config", None)
    expected = getattr(config, "num_hidden_layers", None)
    preferred = None
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        preferred = getattr(get_decoder(), "layers", None)
    fallback = None
    for name, module in model.named_modules():
        if module is preferred and isinstance(module, nn.ModuleList):
            return name, module
        if fallback is None and isinstance(module, nn.ModuleList) and len(module) == expected:
            fallback = (name, module)
    if fallback is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return fallback


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def angular_distances(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    block_size: int,
    batch_size: int = 8,
    max_length: int = 512,
) -> list[float]:
    """Mean angular distance between the residual stream entering each block and leaving it.

    Entry ``l`` (``0 <= l <= n - block_size``) is ``arccos(cos(x_l, x_{l+block_size})) / pi``
    averaged over every attended (non-padding) token of ``prompts``, where ``x_l`` enters
    decoder layer ``l``. States come from ``output_hidden_states=True``, except the last:
    transformers reports the stream *after the final norm* there, so the raw output of the
    last layer is taken with a forward hook. The model runs in eval mode (restored after).
    """
    _, layers = decoder_layers(model)
    num_layers = len(layers)
    if not 1 <= block_size <= num_layers:
        raise ValueError(f"block_size={block_size} must be in [1, {num_layers}]")
    if not prompts:
        raise ValueError("angular_distances needs at least one calibration prompt")
    ensure_pad_token(tokenizer)
    sums = torch.zeros(num_layers - block_size + 1, dtype=torch.float64)
    tokens = 0
    captured: dict[str, torch.Tensor] = {}

    def keep_last(_module: nn.Module, _args: Any, output: Any) -> None:
        captured["last"] = output[0] if isinstance(output, tuple) else output

    # The backbone without the LM head: full-vocabulary logits are not needed.
    backbone = getattr(model, "base_model", model)
    hook = layers[-1].register_forward_hook(keep_last)
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(prompts), batch_size):
            batch = tokenizer(
                list(prompts[first : first + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            ).to(_model_device(model))
            out = backbone(**batch, output_hidden_states=True, use_cache=False)
            if len(out.hidden_states) != num_layers + 1:
                raise RuntimeError(
                    f"expected {num_layers + 1} hidden states, got {len(out.hidden_states)}"
                )
            mask = batch["attention_mask"].bool()
            states = [h[mask].float() for h in out.hidden_states[:num_layers]]
            states.append(captured["last"][mask].float())
            for start in range(len(sums)):
                cos = F.cosine_similarity(states[start], states[start + block_size], dim=-1)
                sums[start] += (torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).sum().double().cpu()
            tokens += int(mask.sum())
    finally:
        hook.remove()
        model.train(was_training)
    return (sums / max(tokens, 1)).tolist()


def _slice_per_layer_config(config: Any, indices: list[int], num_layers: int) -> None:
    """Slice (or remap) every per-layer list of ``config`` to the kept ``indices``."""
    for key, value in list(vars(config).items()):
        if not isinstance(value, (list, tuple)):
            continue
        if key in _INDEX_LIST_KEYS:
            kept = set(value)
            setattr(config, key, [new for new, old in enumerate(indices) if old in kept])
        elif len(value) == num_layers:
            setattr(config, key, type(value)(value[i] for i in indices))


def blank_like(model: PreTrainedModel, config) -> PreTrainedModel:
    """A model of ``model``'s class built from ``config`` without weight initialisation, on
    ``model``'s device and dtype: for students whose every tensor is copied in next."""
    with skip_weight_init():
        blank = type(model)(config)
    reference = next(model.parameters())
    return blank.to(device=reference.device, dtype=reference.dtype)


def derive_student(
    teacher: PreTrainedModel,
    layer_indices: Sequence[int],
    rule: str = "explicit",
    teacher_name: str | None = None,
) -> PreTrainedModel:
    """A new model of the teacher's class that keeps the teacher layers ``layer_indices``.

    The student's config is the teacher's with ``num_hidden_layers = len(layer_indices)``,
    per-layer lists (``layer_types``, ...) sliced, and ``raykd_student = {"teacher",
    "teacher_num_layers", "layers", "rule"}`` recording where it came from (saved with the
    config). Embeddings, final norm and LM head (tied if the teacher's are) and the kept
    layers are copied, not shared; every kept module's ``layer_idx`` is its new position,
    so KV caches index correctly. The student has the teacher's dtype, device and mode.
    """
    prefix, layers = decoder_layers(teacher)
    num_layers = len(layers)
    indices = _check_indices(list(layer_indices), num_layers)

    config = copy.deepcopy(teacher.config)
    if getattr(config, "quantization_config", None) is not None:
        delattr(config, "quantization_config")
    _slice_per_layer_config(config, indices, num_layers)
    config.num_hidden_layers = len(indices)
    config.raykd_student = {
        "teacher": teacher_name or getattr(teacher.config, "_name_or_path", "") or "",
        "teacher_num_layers": num_layers,
        "layers": indices,
        "rule": rule,
    }

    student = blank_like(teacher, config)

    source = teacher.state_dict()
    layer_prefix = prefix + "."
    mapped: dict[str, torch.Tensor] = {}
    for key in student.state_dict():
        teacher_key = key
        if key.startswith(layer_prefix):
            position, _, rest = key[len(layer_prefix) :].partition(".")
            teacher_key = f"{layer_prefix}{indices[int(position)]}.{rest}"
        mapped[key] = source[teacher_key]
    student.load_state_dict(mapped, strict=True)
    student.tie_weights()

    _, student_layers = decoder_layers(student)
    for position, layer in enumerate(student_layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.train(teacher.training)


def student_from_teacher(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    rule: str = "angular",
    keep: int | None = None,
    layers: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    teacher_name: str | None = None,
) -> PreTrainedModel:
    """Select layers by ``rule`` (measuring angular distances on ``prompts`` if needed) and derive.

    ``prompts`` defaults to :data:`DEFAULT_CALIBRATION_PROMPTS`; ``angular`` needs ``tokenizer``.
    """
    _, stack = decoder_layers(teacher)
    num_layers = len(stack)
    distances = None
    if rule == "angular":
        keep = num_layers // 2 + 1 if keep is None else keep
        if 2 <= keep < num_layers:
            if tokenizer is None:
                raise ValueError("rule 'angular' needs a tokenizer to measure distances")
            calibration = list(prompts) if prompts else list(DEFAULT_CALIBRATION_PROMPTS)
            distances = angular_distances(teacher, tokenizer, calibration, num_layers - keep)
    indices = select_layers(num_layers, rule, keep=keep, layers=layers, distances=distances)
    return derive_student(teacher, indices, rule=rule, teacher_name=teacher_name)
