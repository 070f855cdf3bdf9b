"""Models: resolving and loading teachers, deriving students, saving and measuring models.

* :mod:`raykd.models.loading` -- names -> local directories (built-in offline GGUF models are
  converted once into a cache), tokenizer and model loading.
* :mod:`raykd.models.student` -- choosing teacher layers (every_other, first_last, angular,
  explicit) and deriving a layer-subset student.
* :mod:`raykd.models.checks` -- header-only checks of model files (truncated safetensors,
  missing tokenizer, vocabulary size).
* :mod:`raykd.models.io` -- atomic saving, parameter counts, on-disk size.
* :mod:`raykd.models.tiny` -- tiny offline tokenizer and random models for tests.
"""

from raykd.models.checks import (
    ModelFileError,
    check_safetensors,
    check_tokenizer_files,
    config_vocab_size,
)
from raykd.models.io import count_parameters, model_size_mb, save_model
from raykd.models.loading import (
    BUILTIN_MODELS,
    BuiltinModel,
    ModelNotFoundError,
    ensure_pad_token,
    is_gptq_checkpoint,
    load_model,
    load_tokenizer,
    model_cache_dir,
    resolve_model,
)
from raykd.models.student import (
    DEFAULT_CALIBRATION_PROMPTS,
    RULES,
    angular_distances,
    decoder_layers,
    derive_student,
    select_layers,
    student_from_teacher,
)
from raykd.models.tiny import (
    build_tiny_model,
    build_tiny_tokenizer,
    from_config,
    tiny_llama_config,
)

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_CALIBRATION_PROMPTS",
    "RULES",
    "BuiltinModel",
    "ModelFileError",
    "ModelNotFoundError",
    "angular_distances",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "check_safetensors",
    "check_tokenizer_files",
    "config_vocab_size",
    "count_parameters",
    "decoder_layers",
    "derive_student",
    "ensure_pad_token",
    "is_gptq_checkpoint",
    "from_config",
    "load_model",
    "load_tokenizer",
    "model_cache_dir",
    "model_size_mb",
    "resolve_model",
    "save_model",
    "select_layers",
    "student_from_teacher",
    "tiny_llama_config",
]
