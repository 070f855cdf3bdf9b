"""Loading quantized checkpoints and measuring them: memory, load time, speed, agreement, error.

A GPTQ-layout checkpoint (from either method of :func:`raykd.quantize.quantize`) loads in
plain transformers: its ``quantization_config`` routes ``from_pretrained`` through optimum to
GPTQModel's quantized linear kernels (on CPU with 4 bits: an int4 matmul, ``TorchAtenLinear``,
which converts scales to bfloat16 on its first forward; other widths dequantize then matmul).

* :func:`measure` -- load time, peak and retained RSS growth during the load, greedy
  generation speed (new tokens per second, batch 1), the generated ids and texts;
* :func:`greedy_agreement` -- how often two models' greedy continuations are identical;
* :func:`output_error` -- per-token ``KL(p_ref || p_cand)`` of next-token distributions and
  top-1 agreement on given texts (what GPTQ minimises, layer by layer);
* :func:`weight_error` -- relative squared error ``||W_hat - W||^2 / ||W||^2`` of the
  dequantized weights read from the checkpoint files (what RTN minimises, per group).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import PreTrainedModel

from raykd.models import load_model, load_tokenizer, resolve_model
from raykd.models.gptq_backend import import_gptqmodel
from raykd.quantize.accounting import checkpoint_stats
from raykd.quantize.gptq_format import dequantize_packed

__all__ = [
    "PeakRSS",
    "greedy_agreement",
    "is_quantized",
    "load_checkpoint",
    "load_quantized",
    "measure",
    "output_error",
    "weight_error",
]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager sampling this process's resident set size every ``interval`` seconds.

    After the block: ``peak_delta_mb`` (highest RSS seen minus RSS at entry) and
    ``delta_mb`` (RSS at exit minus RSS at entry), in MiB. Linux (``/proc``) only.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak_delta_mb = self.delta_mb = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._start = self._peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        end = _rss_bytes()
        self._peak = max(self._peak, end)
        self.peak_delta_mb = (self._peak - self._start) / 2**20
        self.delta_mb = (end - self._start) / 2**20


def is_quantized(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory/config.json`` has a ``quantization_config``."""
    config = Path(directory).expanduser() / "config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("quantization_config"))


def load_quantized(
    directory: str | os.PathLike[str], *, dtype: str | torch.dtype = "float32", device: str = "cpu"
) -> PreTrainedModel:
    """Load a GPTQ-layout checkpoint with transformers (+ optimum + gptqmodel), eval mode.

    ``dtype`` is the compute dtype of the tensors that are not quantized.
    """
    if not is_quantized(directory):
        raise ValueError(
            f"{str(directory)!r} is not a quantized checkpoint (no quantization_config)"
        )
    # raykd.models.load_model loads GPTQ checkpoints (gptqmodel imported first, cleanly)
    return load_model(str(Path(directory).expanduser()), dtype=dtype, device_map=device)


def load_checkpoint(
    directory: str | os.PathLike[str], *, dtype: str | torch.dtype = "float32", device: str = "cpu"
) -> PreTrainedModel:
    """:func:`load_quantized` for quantized checkpoints, :func:`raykd.models.load_model` otherwise."""
    if is_quantized(resolve_model(directory)):
        return load_quantized(resolve_model(directory), dtype=dtype, device=device)
    return load_model(directory, dtype=dtype).to(device)


def _as_ids(items: Sequence[str | Sequence[int]], tokenizer: Any) -> list[list[int]]:
    return [
        tokenizer(x, add_special_tokens=False)["input_ids"]
        if isinstance(x, str)
        else [int(t) for t in x]
        for x in items
    ]


def _timed_generation(
    model: PreTrainedModel, tokenizer: Any, prompt_ids: list[list[int]], max_new_tokens: int
) -> tuple[list[list[int]], float, float, float]:
    """Greedy new ids per prompt (batch 1); seconds of the untimed warm-up; wall and CPU
    seconds (all threads) of the timed generation."""

    def generate(ids: list[int], new_tokens: int) -> list[int]:
        input_ids = torch.tensor([ids])
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        return out[0, len(ids) :].tolist()

    start = time.perf_counter()
    generate(prompt_ids[0], 2)
    first_call = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    outputs = [generate(ids, max_new_tokens) for ids in prompt_ids]
    return outputs, first_call, time.perf_counter() - start, time.process_time() - cpu_start


@torch.no_grad()
def measure(
    model_dir: str | os.PathLike[str],
    prompts: Sequence[str | Sequence[int]],
    *,
    max_new_tokens: int = 32,
    dtype: str | torch.dtype = "float32",
) -> dict[str, Any]:
    """Load ``model_dir`` (quantized or not) and time greedy generation on ``prompts``.

    Prompts are texts (tokenised as is, no special tokens added: pass chat-formatted text)
    or token ids; each is generated alone (batch 1) after one untimed 2-token warm-up call.

    Returns ``load_seconds``, ``load_peak_rss_mb`` (peak RSS growth during the load),
    ``load_rss_mb`` (RSS growth kept after it), ``peak_rss_mb`` (peak RSS growth over load and
    generation: the working set, since safetensors maps float weights lazily and a float model's
    load touches few pages), ``first_call_seconds`` (the warm-up,
    which includes kernel set-up), ``generate_seconds``, ``new_tokens``, ``tokens_per_second``,
    ``generate_cpu_seconds`` and ``tokens_per_cpu_second`` (process CPU time, all threads:
    less sensitive than wall time to other processes competing for the cores),
    ``outputs`` (new token ids per prompt), ``texts`` (decoded), ``size_mb`` and ``params``
    (:func:`raykd.quantize.checkpoint_stats`), ``quantized``, and ``threads``.
    """
    directory = resolve_model(model_dir)
    tokenizer = load_tokenizer(directory)
    prompt_ids = _as_ids(prompts, tokenizer)
    if not prompt_ids or not all(prompt_ids):
        raise ValueError("measure needs at least one non-empty prompt")
    if is_quantized(directory):
        import_gptqmodel()  # import cost is not load cost
    with PeakRSS() as total_rss:
        with PeakRSS() as rss:
            start = time.perf_counter()
            model = load_checkpoint(directory, dtype=dtype)
            load_seconds = time.perf_counter() - start
        outputs, first_call, seconds, cpu_seconds = _timed_generation(
            model, tokenizer, prompt_ids, max_new_tokens
        )

    new_tokens = sum(len(o) for o in outputs)
    stats = checkpoint_stats(directory)
    return {
        "model_dir": directory,
        "quantized": is_quantized(directory),
        "load_seconds": load_seconds,
        "load_peak_rss_mb": rss.peak_delta_mb,
        "load_rss_mb": rss.delta_mb,
        "peak_rss_mb": total_rss.peak_delta_mb,
        "first_call_seconds": first_call,
        "generate_seconds": seconds,
        "new_tokens": new_tokens,
        "tokens_per_second": new_tokens / seconds if seconds > 0 else None,
        "generate_cpu_seconds": cpu_seconds,
        "tokens_per_cpu_second": new_tokens / cpu_seconds if cpu_seconds > 0 else None,
        "outputs": outputs,
        "texts": [tokenizer.decode(o, skip_special_tokens=True) for o in outputs],
        "size_mb": stats["size_mb"],
        "params": stats["params"],
        "threads": torch.get_num_threads(),
    }


def greedy_agreement(
    reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]
) -> dict[str, float]:
    """``exact``: share of prompts with identical continuations; ``prefix``: mean share of the
    reference continuation matched before the first differing token."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError("greedy_agreement needs two equally long, non-empty lists of outputs")
    exact = prefix = 0.0
    for ref, cand in zip(reference, candidate, strict=True):
        exact += float(list(ref) == list(cand))
        same = 0
        for a, b in zip(ref, cand):
            if a != b:
                break
            same += 1
        prefix += same / len(ref) if ref else float(not cand)
    return {"exact": exact / len(reference), "prefix": prefix / len(reference)}


@torch.no_grad()
def output_error(
    reference: PreTrainedModel,
    candidate: PreTrainedModel,
    texts: Sequence[str | Sequence[int]],
    tokenizer: Any,
    max_tokens: int = 256,
) -> dict[str, float]:
    """Mean per-token ``KL(p_ref || p_cand)`` (nats) and top-1 agreement of next-token
    distributions over ``texts`` (each truncated to ``max_tokens``), one text at a time."""
    kl_sum = agree = count = 0.0
    for ids in _as_ids(texts, tokenizer):
        if len(ids) < 2:
            continue
        input_ids = torch.tensor([ids[:max_tokens]])
        ref = F.log_softmax(reference(input_ids).logits.float()[0], -1)
        cand = F.log_softmax(candidate(input_ids).logits.float()[0], -1)
        kl_sum += float((ref.exp() * (ref - cand)).sum())
        agree += float((ref.argmax(-1) == cand.argmax(-1)).sum())
        count += ref.shape[0]
    if not count:
        raise ValueError("output_error needs at least one text of two or more tokens")
    return {"kl": kl_sum / count, "top1_agreement": agree / count, "tokens": count}


def weight_error(
    float_model: PreTrainedModel | str | os.PathLike[str], quantized_dir: str | os.PathLike[str]
) -> dict[str, Any]:
    """Relative squared error of every quantized weight, read from the checkpoint files.

    Returns ``relative`` (``sum ||W_hat - W||^2 / sum ||W||^2`` over all quantized layers),
    ``per_layer`` (the same per layer name) and ``layers``.
    """
    model = float_model
    if not isinstance(model, torch.nn.Module):
        model = load_model(model, dtype="float32")
    weights = dict(model.named_parameters())
    directory = Path(quantized_dir).expanduser()
    quant = json.loads((directory / "config.json").read_text())["quantization_config"]
    bits = int(quant["bits"])
    checkpoint_format = quant.get("checkpoint_format") or quant.get("format") or "gptq"
    per_layer: dict[str, float] = {}
    err_total = norm_total = 0.0
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            for name in sorted(n[: -len(".qweight")] for n in names if n.endswith(".qweight")):
                keys = ("qweight", "qzeros", "scales", "g_idx")
                tensors = {k: handle.get_tensor(f"{name}.{k}") for k in keys}
                w_hat = dequantize_packed(tensors, bits, checkpoint_format)
                w = weights[f"{name}.weight"].detach().float()
                err, norm = float((w_hat - w).pow(2).sum()), float(w.pow(2).sum())
                per_layer[name] = err / norm if norm else 0.0
                err_total += err
                norm_total += norm
    if not per_layer:
        raise ValueError(f"no quantized layers in {str(directory)!r}")
    return {"relative": err_total / norm_total, "per_layer": per_layer, "layers": len(per_layer)}
