"""Width pruning (Minitron): fewer attention heads, MLP channels and hidden channels.

Importance is measured with forward hooks on calibration prompts (every attended,
non-padding token ``t``), per decoder layer ``l``:

``heads``
    The output of query head ``h`` before ``o_proj`` (a ``head_dim`` vector ``a_h(t)``).
``mlp``
    The input of ``down_proj``, ``act(gate(x)) * up(x)``: one scalar ``a_c(t)`` per channel.
``hidden``
    One score per residual (embedding) channel for the whole model: the sum, over every
    RMSNorm of the model (each layer's two norms and the final norm), of that norm's output
    channel scores.

A unit's score is ``mean_t mean_i |a_i(t)|`` (``aggregate="mean_abs"``) or
``sqrt(mean_t sum_i a_i(t)^2)`` (``"l2"``), ``i`` over the unit's dimensions.

Pruning keeps, per layer, the highest-scoring MLP channels and the highest-scoring KV
*groups* (grouped-query attention: a group is one key/value head and the ``n_rep`` query
heads that read it; its score is the sum of its query heads' scores), inside each kept group
the highest-scoring query heads; and, for the whole model, the highest-scoring hidden
channels. Ties go to the lower index; kept units stay in their original order, so keeping
everything reproduces the model exactly. ``head_dim`` is unchanged.

The result is a model of the same class with a smaller config (``hidden_size``,
``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``; ``head_dim`` set
explicitly): a standard checkpoint that ``AutoModelForCausalLM`` loads without custom code.
Pruned hidden channels change what each RMSNorm averages over, so that cut is not exact even
when the pruned channels are zero.

Sizes come from :func:`solve_width`: every axis named in ``axes`` keeps the same share ``r``
of its size (the MLP size rounded to a multiple of ``multiple``, the hidden size to a
multiple of ``lcm(multiple, num_attention_heads)`` -- transformers requires the hidden size
to divide by the head count -- the KV-group count rounded to the nearest integer, at least
one of each), ``r`` the largest share whose non-embedding parameter count is at most the
target; sizes given explicitly are kept as given.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from raykd.models.io import count_parameters
from raykd.models.loading import ensure_pad_token
from raykd.models.student import blank_like, decoder_layers

__all__ = [
    "AGGREGATES",
    "WIDTH_AXES",
    "WidthImportance",
    "WidthSizes",
    "non_embedding_params",
    "prune_width",
    "solve_width",
    "width_importance",
    "width_student",
]

AGGREGATES = ("mean_abs", "l2")
WIDTH_AXES = ("mlp", "heads", "hidden")
_SIZE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


@dataclass(frozen=True)
class WidthSizes:
    """The four sizes width pruning changes (``head_dim`` and the layer count stay)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in _SIZE_KEYS}


@dataclass
class WidthImportance:
    """Scores from :func:`width_importance`: ``heads`` ``[layers, num_attention_heads]``,
    ``mlp`` ``[layers, intermediate_size]``, ``hidden`` ``[hidden_size]`` (float64), and the
    number of calibration tokens they were averaged over."""

    heads: torch.Tensor
    mlp: torch.Tensor
    hidden: torch.Tensor
    tokens: int = 0


def _sizes_of(config: Any) -> WidthSizes:
    return WidthSizes(*(int(getattr(config, k)) for k in _SIZE_KEYS))


def _head_dim(config: Any) -> int:
    return int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )


def _parts(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    needed = [(attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
              (mlp, ("gate_proj", "up_proj", "down_proj"))]  # fmt: skip
    for module, names in needed:
        if module is None or not all(
            isinstance(getattr(module, n, None), nn.Linear) for n in names
        ):
            raise ValueError(
                f"width pruning supports Llama-style layers (self_attn.q/k/v/o_proj, "
                f"mlp.gate/up/down_proj); {type(layer).__name__} has another structure"
            )
    return attn, mlp


def _layer_norms(layer: nn.Module, hidden: int) -> list[nn.Module]:
    """The norms of one decoder layer over the residual stream (``*layernorm``, size hidden)."""
    return [
        module
        for name, module in layer.named_children()
        if name.endswith("layernorm") and getattr(module, "weight", None) is not None
        and module.weight.shape == (hidden,)
    ]  # fmt: skip


def _norms(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """Every norm over the residual stream: each layer's, then the final one."""
    found = [m for layer in layers for m in _layer_norms(layer, model.config.hidden_size)]
    final = getattr(model.get_decoder(), "norm", None)
    if final is not None:
        found.append(final)
    return found


# ---- importance ------------------------------------------------------------------------------
class _Accumulator:
    """Sums of ``|a|`` (or ``a^2``) per unit over attended tokens."""

    def __init__(self, units: int, unit_dim: int, aggregate: str):
        self.sums = torch.zeros(units, dtype=torch.float64)
        self.unit_dim, self.aggregate = unit_dim, aggregate

    def add(self, act: torch.Tensor, mask: torch.Tensor) -> None:
        a = act[mask].double().reshape(-1, self.sums.numel(), self.unit_dim)
        if self.aggregate == "mean_abs":
            self.sums += a.abs().mean(-1).sum(0).cpu()
        else:
            self.sums += a.pow(2).sum(-1).sum(0).cpu()

    def result(self, tokens: int) -> torch.Tensor:
        mean = self.sums / max(tokens, 1)
        return mean if self.aggregate == "mean_abs" else mean.sqrt()


@torch.no_grad()
def width_importance(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    aggregate: str = "mean_abs",
    batch_size: int = 8,
    max_length: int = 512,
) -> WidthImportance:
    """Activation importance of every query head, MLP channel and hidden channel (module
    docstring) on ``prompts``; padding tokens are ignored. The model runs in eval mode
    (restored after)."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; choose one of {AGGREGATES}")
    if not prompts:
        raise ValueError("width_importance needs at least one calibration prompt")
    ensure_pad_token(tokenizer)
    config = model.config
    _, layers = decoder_layers(model)
    d = _head_dim(config)
    heads = [_Accumulator(config.num_attention_heads, d, aggregate) for _ in layers]
    mlp = [_Accumulator(config.intermediate_size, 1, aggregate) for _ in layers]
    norms = _norms(model, layers)
    hidden = [_Accumulator(config.hidden_size, 1, aggregate) for _ in norms]
    state: dict[str, torch.Tensor] = {}

    def pre_hook(acc: _Accumulator):
        return lambda _m, args: acc.add(args[0], state["mask"])

    def out_hook(acc: _Accumulator):
        return lambda _m, _a, out: acc.add(out[0] if isinstance(out, tuple) else out, state["mask"])

    hooks = []
    for layer, h_acc, m_acc in zip(layers, heads, mlp, strict=True):
        attn, block = _parts(layer)
        hooks.append(attn.o_proj.register_forward_pre_hook(pre_hook(h_acc)))
        hooks.append(block.down_proj.register_forward_pre_hook(pre_hook(m_acc)))
    for norm, acc in zip(norms, hidden, strict=True):
        hooks.append(norm.register_forward_hook(out_hook(acc)))
    backbone = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for first in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[first : first + batch_size]), return_tensors="pt",
                              padding=True, truncation=True, max_length=max_length).to(device)  # fmt: skip
            state["mask"] = batch["attention_mask"].bool()
            backbone(**batch, use_cache=False)
            tokens += int(state["mask"].sum())
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return WidthImportance(
        heads=torch.stack([a.result(tokens) for a in heads]),
        mlp=torch.stack([a.result(tokens) for a in mlp]),
        hidden=torch.stack([a.result(tokens) for a in hidden]).sum(0),
        tokens=tokens,
    )


# ---- sizes -----------------------------------------------------------------------------------
def _linear_has_bias(model: PreTrainedModel, part: str, name: str) -> bool:
    _, layers = decoder_layers(model)
    return getattr(getattr(layers[0], part), name).bias is not None


def non_embedding_params(model: PreTrainedModel, sizes: WidthSizes) -> int:
    """Non-embedding parameters (as :func:`~raykd.models.io.count_parameters` counts them) of
    ``model`` pruned to ``sizes``: per layer ``D*d*(2*Hq + 2*K)`` attention weights,
    ``3*D*I`` MLP weights, the biases the model has, ``D`` per hidden-size norm, plus
    whatever else the model holds that width pruning does not touch (e.g. Qwen3's per-head
    q/k norms), taken from the model itself."""
    config = model.config
    _, layers = decoder_layers(model)
    d = _head_dim(config)
    norms_per_layer = len(_layer_norms(layers[0], config.hidden_size))
    has_final = getattr(model.get_decoder(), "norm", None) is not None
    attn_bias = [_linear_has_bias(model, "self_attn", n) for n in ("q_proj", "k_proj", "o_proj")]
    mlp_bias = [_linear_has_bias(model, "mlp", n) for n in ("gate_proj", "down_proj")]

    def formula(s: WidthSizes) -> int:
        hid, heads, kv, inter = (
            s.hidden_size, s.num_attention_heads, s.num_key_value_heads, s.intermediate_size
        )  # fmt: skip
        per_layer = hid * d * (2 * heads + 2 * kv) + 3 * hid * inter + norms_per_layer * hid
        per_layer += attn_bias[0] * heads * d + attn_bias[1] * 2 * kv * d + attn_bias[2] * hid
        per_layer += mlp_bias[0] * 2 * inter + mlp_bias[1] * hid
        return len(layers) * per_layer + has_final * hid

    untouched = count_parameters(model)["non_embedding"] - formula(_sizes_of(config))
    return formula(sizes) + untouched


def _shrink(size: int, share: float, multiple: int) -> int:
    if size <= multiple:
        return size
    return min(size, max(multiple, int(math.floor(share * size / multiple + 0.5)) * multiple))


def _check_sizes(orig: WidthSizes, s: WidthSizes) -> None:
    """Sizes a standard checkpoint of the model's class can hold (ValueError otherwise)."""
    for key in _SIZE_KEYS:
        if not 1 <= getattr(s, key) <= getattr(orig, key):
            raise ValueError(f"width: {key}={getattr(s, key)} must be in [1, "
                             f"{getattr(orig, key)}] (the model's size)")  # fmt: skip
    heads, kv = s.num_attention_heads, s.num_key_value_heads
    n_rep = orig.num_attention_heads // orig.num_key_value_heads
    if heads % kv or heads // kv > n_rep:
        raise ValueError(f"width: num_attention_heads={heads} must be a multiple of "
                         f"num_key_value_heads={kv}, at most {n_rep} per group")  # fmt: skip
    if s.hidden_size % heads:  # transformers' config validation requires it (Llama, Qwen, ...)
        raise ValueError(f"width: hidden_size={s.hidden_size} must be a multiple of "
                         f"num_attention_heads={heads}")  # fmt: skip


def solve_width(
    model: PreTrainedModel,
    target_non_embedding_params: int | None = None,
    axes: Sequence[str] = ("mlp", "hidden"),
    fixed: Mapping[str, int | None] | None = None,
    multiple: int = 16,
) -> WidthSizes:
    """The sizes of the pruned model (module docstring): ``fixed`` sizes as given, the
    ``axes`` shrunk by the largest common share ``r`` (searched in steps of 1/1000) that fits
    ``target_non_embedding_params``; without a target, only ``fixed`` applies."""
    config = model.config
    orig = _sizes_of(config)
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    unknown = set(fixed) - set(_SIZE_KEYS) or set(axes) - set(WIDTH_AXES)
    if unknown:
        raise ValueError(f"unknown width setting(s) {sorted(unknown)}; sizes: {_SIZE_KEYS}, "
                         f"axes: {WIDTH_AXES}")  # fmt: skip
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    n_rep = orig.num_attention_heads // orig.num_key_value_heads

    def sizes_at(r: float) -> WidthSizes:
        kv = fixed.get("num_key_value_heads")
        if kv is None:
            kv = orig.num_key_value_heads
            if "heads" in axes:
                kv = min(kv, max(1, int(math.floor(r * kv + 0.5))))
        heads = fixed.get("num_attention_heads") or kv * n_rep
        hidden = fixed.get("hidden_size") or orig.hidden_size
        if "hidden" in axes and "hidden_size" not in fixed:  # a multiple of the head count too
            hidden = _shrink(orig.hidden_size, r, math.lcm(multiple, heads))
        inter = fixed.get("intermediate_size") or orig.intermediate_size
        if "mlp" in axes and "intermediate_size" not in fixed:
            inter = _shrink(orig.intermediate_size, r, multiple)
        return WidthSizes(hidden, inter, heads, kv)

    def check(s: WidthSizes) -> WidthSizes:
        _check_sizes(orig, s)
        return s

    if target_non_embedding_params is None:
        return check(sizes_at(1.0))
    best: tuple[int, float, WidthSizes] | None = None
    for step in range(1000, 0, -1):
        s = check(sizes_at(step / 1000))
        n = non_embedding_params(model, s)
        if n <= target_non_embedding_params and (best is None or n > best[0]):
            best = (n, step, s)
    if best is None:
        smallest = non_embedding_params(model, sizes_at(0.001))
        raise ValueError(
            f"width: no sizes reach {target_non_embedding_params:,} non-embedding parameters "
            f"by shrinking {list(axes)} (the smallest is {smallest:,}): prune more axes, cut "
            f"layers first (student.keep), or lower student.width_multiple"
        )
    return best[2]


# ---- pruning ---------------------------------------------------------------------------------
def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores (ties: lower index), in ascending index order."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def _kept_heads(scores: torch.Tensor, n_rep: int, groups: int, per_group: int):
    """(query-head indices, kv-head indices) kept in one layer."""
    by_group = scores.reshape(-1, n_rep)
    kv = _top(by_group.sum(-1), groups)
    q = [int(g) * n_rep + int(j) for g in kv for j in _top(by_group[g], per_group)]
    return torch.tensor(q, dtype=torch.long), kv


def _expand(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def prune_width(
    model: PreTrainedModel,
    importance: WidthImportance,
    sizes: WidthSizes,
) -> PreTrainedModel:
    """A new model of ``model``'s class with ``sizes``, keeping the highest-importance units
    (module docstring); weights are copied (not shared), dtype, device, mode and generation
    config are the model's; ``config.raykd_student["width"]`` records the sizes and what was
    kept."""
    config = model.config
    orig = _sizes_of(config)
    _check_sizes(orig, sizes)
    d = _head_dim(config)
    n_rep = orig.num_attention_heads // orig.num_key_value_heads
    per_group = sizes.num_attention_heads // sizes.num_key_value_heads
    prefix, layers = decoder_layers(model)
    hidden_idx = _top(importance.hidden, sizes.hidden_size)
    per_layer = []
    for layer_no in range(len(layers)):
        q, kv = _kept_heads(importance.heads[layer_no], n_rep, sizes.num_key_value_heads, per_group)
        per_layer.append({"q": _expand(q, d), "kv": _expand(kv, d), "q_heads": q, "kv_heads": kv,
                          "mlp": _top(importance.mlp[layer_no], sizes.intermediate_size)})  # fmt: skip

    new_config = copy.deepcopy(config)
    if getattr(new_config, "quantization_config", None) is not None:
        delattr(new_config, "quantization_config")
    for key, value in sizes.as_dict().items():
        setattr(new_config, key, value)
    new_config.head_dim = d
    record = dict(getattr(config, "raykd_student", None) or {})
    record.setdefault("teacher", getattr(config, "_name_or_path", "") or "")
    record.setdefault("teacher_num_layers", len(layers))
    record.setdefault("layers", list(range(len(layers))))
    record.setdefault("rule", "width")
    record["width"] = {"from": orig.as_dict(), "to": sizes.as_dict(),
                       "kv_heads": [p["kv_heads"].tolist() for p in per_layer]}  # fmt: skip
    new_config.raykd_student = record

    student = blank_like(model, new_config)

    source = model.state_dict()
    layer_prefix = prefix + "."
    mapped = {}
    for key, target in student.state_dict().items():
        tensor = source[key]
        if key.startswith(layer_prefix):
            kept = per_layer[int(key[len(layer_prefix) :].split(".", 1)[0])]
            rows, cols = _slices(key, kept, hidden_idx)
        else:  # embeddings, LM head, final norm: the hidden channels are the last dimension
            rows, cols = None, (hidden_idx if tensor.shape[-1] == orig.hidden_size else None)
        if rows is not None:
            tensor = tensor.index_select(0, rows)
        if cols is not None:
            tensor = tensor.index_select(tensor.dim() - 1, cols)
        if tensor.shape != target.shape:
            raise ValueError(f"width pruning: cannot map {key} {tuple(source[key].shape)} to "
                             f"{tuple(target.shape)} (unsupported parameter)")  # fmt: skip
        mapped[key] = tensor.clone()
    student.load_state_dict(mapped, strict=True)
    student.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(model.generation_config)
    return student.train(model.training)


def _slices(key: str, kept: dict, hidden: torch.Tensor):
    """(row indices, last-dim indices) of a decoder-layer tensor; None = all."""
    name = key.rsplit(".", 2)
    module, kind = name[-2], name[-1]
    in_hidden = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "gate_proj": "mlp",
                 "up_proj": "mlp"}  # fmt: skip
    if module in in_hidden:  # out-features = heads / channels, in-features = hidden
        return kept[in_hidden[module]], (hidden if kind == "weight" else None)
    if module in ("o_proj", "down_proj"):  # out-features = hidden, in-features = heads / channels
        last = kept["q" if module == "o_proj" else "mlp"]
        return (hidden, last) if kind == "weight" else (hidden, None)
    if module.endswith("layernorm"):
        return None, hidden
    return None, None


def width_student(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    target_non_embedding_params: int | None = None,
    axes: Sequence[str] = ("mlp", "hidden"),
    fixed: Mapping[str, int | None] | None = None,
    multiple: int = 16,
    aggregate: str = "mean_abs",
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Measure importance on ``prompts``, solve the sizes, prune; return the model and a
    summary (sizes before/after, the calibration token count, the predicted and the counted
    non-embedding parameters, which must agree)."""
    if target_non_embedding_params is None and not any(v for v in (fixed or {}).values()):
        raise ValueError("width pruning needs a target (student.target_non_embedding_params) "
                         "or sizes (student.width_sizes)")  # fmt: skip
    sizes = solve_width(model, target_non_embedding_params, axes, fixed, multiple)
    importance = width_importance(model, tokenizer, prompts, aggregate=aggregate)
    predicted = non_embedding_params(model, sizes)
    student = prune_width(model, importance, sizes)
    counted = count_parameters(student)["non_embedding"]
    if counted != predicted:  # the size formula missed a parameter of this architecture
        raise RuntimeError(f"width: predicted {predicted:,} non-embedding parameters, the "
                           f"pruned model has {counted:,}")  # fmt: skip
    return student, {
        "from": _sizes_of(model.config).as_dict(),
        "to": sizes.as_dict(),
        "axes": list(axes),
        "aggregate": aggregate,
        "target_non_embedding_params": target_non_embedding_params,
        "non_embedding_params": counted,
        "calibration_tokens": importance.tokens,
    }
