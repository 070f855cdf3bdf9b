"""Post-training weight quantization: GPTQ (through GPTQModel) and a round-to-nearest baseline.

The last pipeline stage: take a float student, quantize every decoder-layer ``Linear`` to
3/4/8-bit codes with per-group scales and zero points, save a GPTQ-layout checkpoint that
transformers loads (with the ``quant`` extra: gptqmodel + optimum), and measure it.

* :func:`quantize` -- ``model_dir -> out_dir`` (atomic, skipped when already complete);
* :func:`check_quant_settings` / :func:`check_quant_config` -- reject bad ``bits`` /
  ``group_size`` for a model before loading anything;
* :func:`load_quantized`, :func:`measure` -- load and time (memory, load, tokens/s);
* :func:`checkpoint_stats` -- size on disk and logical parameter counts of packed weights;
* :func:`output_error`, :func:`weight_error`, :func:`greedy_agreement` -- how far the
  quantized model is from the float one.

GPTQModel is imported only inside the functions that need it (see
:mod:`raykd.models.gptq_backend`); this package never imports Ray.
"""

from raykd.config.quant import (
    METHODS,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    check_quant_config,
    check_quant_settings,
    linear_dims,
)
from raykd.quantize.accounting import checkpoint_stats
from raykd.quantize.core import SUMMARY_FILE, quantize, read_summary
from raykd.quantize.measure import (
    PeakRSS,
    greedy_agreement,
    is_quantized,
    load_checkpoint,
    load_quantized,
    measure,
    output_error,
    weight_error,
)
from raykd.quantize.rtn import dequantize, rtn_quantize_weight, write_rtn_checkpoint

__all__ = [
    "METHODS",
    "SUMMARY_FILE",
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "PeakRSS",
    "check_quant_config",
    "check_quant_settings",
    "checkpoint_stats",
    "dequantize",
    "greedy_agreement",
    "is_quantized",
    "linear_dims",
    "load_checkpoint",
    "load_quantized",
    "measure",
    "output_error",
    "quantize",
    "read_summary",
    "rtn_quantize_weight",
    "weight_error",
    "write_rtn_checkpoint",
]
