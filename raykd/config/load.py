"""Load a :class:`RunConfig` from YAML files and dotlist overrides, failing loudly.

Files are merged left to right onto the structured defaults, then the overrides
(``learner.lr=1e-5``).  A YAML file may name fragments to merge *before* itself with a
top-level ``extends:`` list (paths relative to that file).  Any unknown key, wrong type or
missing file raises :class:`ConfigError` naming the key and the file it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from raykd.config.schema import RunConfig


class ConfigError(ValueError):
    """A configuration problem, with the offending key and source in the message."""


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> list[tuple[str, dict[str, Any]]]:
    """Return ``[(source, mapping), ...]``: the fragments a file extends, then the file itself."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in chain:
        raise ConfigError(f"{path}: 'extends' forms a cycle through {[str(p) for p in chain]}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    extends = data.pop("extends", []) or []
    if isinstance(extends, str):
        extends = [extends]
    out: list[tuple[str, dict[str, Any]]] = []
    for rel in extends:
        out.extend(_read_yaml((path.parent / rel), chain + (path.resolve(),)))
    out.append((str(path), data))
    return out


def _first_line(err: OmegaConfBaseException) -> str:
    return str(getattr(err, "msg", err)).splitlines()[0]


def _merge(base: DictConfig, source: str, update: DictConfig | dict) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as err:
        key = getattr(err, "full_key", None) or str(err)
        raise ConfigError(f"{source}: unknown config key '{key}' ({_first_line(err)})") from None
    except ValidationError as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(
            f"{source}: wrong type for config key '{key}': {_first_line(err)}"
        ) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{source}: invalid config at '{key}': {_first_line(err)}") from None


def load_config(files: list[str | Path] | str | Path | None = None, overrides=()) -> RunConfig:
    """Merge structured defaults <- YAML files (with their ``extends``) <- dotlist overrides.

    Returns a read-only ``DictConfig`` typed as :class:`RunConfig` (attribute access works).
    """
    if files is None:
        files = []
    elif isinstance(files, (str, Path)):
        files = [files]
    cfg = OmegaConf.structured(RunConfig)
    for f in files:
        for source, data in _read_yaml(Path(f), ()):
            cfg = _merge(cfg, source, data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command-line override '{item}' is not of the form key=value")
        try:
            dot = OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            msg = str(err).splitlines()[0]
            raise ConfigError(f"command-line override '{item}': {msg}") from None
        cfg = _merge(cfg, f"command-line override '{item}'", dot)
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg  # type: ignore[return-value]


_CHOICES = {
    "student.init": ("from_teacher", "pretrained", "config"),
    "student.rule": ("every_other", "first_last", "angular", "explicit"),
    "student.trainable": ("all", "layers"),
    "teacher.backend": ("hf", "vllm"),
    "rollout.backend": ("hf", "vllm"),
}


def validate(cfg: DictConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key '{key}' = {value!r}; expected one of {list(choices)}")
    from raykd.algorithms import ALGORITHMS  # late import: algorithms import config

    for name in cfg.pipeline.train:
        if name not in ALGORITHMS:
            raise ConfigError(
                f"config key 'pipeline.train' names unknown algorithm {name!r}; "
                f"known: {sorted(ALGORITHMS)}"
            )
    if cfg.learner.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'learner.zero_stage' = {cfg.learner.zero_stage}; 0..3")
    if cfg.student.init == "from_teacher" and cfg.student.rule == "explicit":
        if not cfg.student.layers:
            raise ConfigError("student.rule=explicit needs 'student.layers' (a list of indices)")
    elif cfg.student.init == "from_teacher" and cfg.student.keep is None:
        if cfg.student.rule != "every_other":
            raise ConfigError(f"student.rule={cfg.student.rule} needs 'student.keep'")
    if cfg.student.init == "pretrained" and not cfg.student.model:
        raise ConfigError("student.init=pretrained needs 'student.model'")
    rk = cfg.reverse_kl
    if not 0.0 <= rk.mix_alpha < 1.0:
        raise ConfigError(f"config key 'reverse_kl.mix_alpha' = {rk.mix_alpha}; must be in [0, 1)")
    if rk.mix_alpha > 0 and (cfg.rollout.temperature != 1.0 or cfg.rollout.top_p != 1.0):
        raise ConfigError(
            "config key 'reverse_kl.mix_alpha' > 0 samples the teacher-student mixture at "
            "temperature 1: set 'rollout.temperature' = 1.0 and 'rollout.top_p' = 1.0"
        )


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the fully resolved config (enough to reproduce the run)."""
    from raykd.pipeline.rundir import atomic_write_text

    atomic_write_text(Path(path), OmegaConf.to_yaml(cfg, resolve=True))
