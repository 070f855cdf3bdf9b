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
from raykd.config.stages import expand_stages
from raykd.config.validate import validate_config


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


def _flat_keys(data: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every leaf (and every mapping) of a nested mapping."""
    out: list[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}{k}"
            out.append(key)
            out.extend(_flat_keys(v, key + "."))
    return out


def load_config(files: list[str | Path] | str | Path | None = None, overrides=()) -> RunConfig:
    """Merge structured defaults <- YAML files (with their ``extends``) <- dotlist overrides,
    expand the stage shorthands, and validate everything (:mod:`raykd.config.validate`).

    Returns a read-only ``DictConfig`` typed as :class:`RunConfig` (attribute access works).
    Raises :class:`ConfigError` listing every problem, each naming key, value and source.
    """
    if files is None:
        files = []
    elif isinstance(files, (str, Path)):
        files = [files]
    cfg = OmegaConf.structured(RunConfig)
    origins: dict[str, str] = {}
    for f in files:
        for source, data in _read_yaml(Path(f), ()):
            cfg = _merge(_clear_other_form(cfg, data), source, data)
            origins.update(dict.fromkeys(_flat_keys(data), source))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command-line override '{item}' is not of the form key=value")
        try:
            dot = OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            msg = str(err).splitlines()[0]
            raise ConfigError(f"command-line override '{item}': {msg}") from None
        source = f"command-line override '{item}'"
        cfg = _merge(_clear_other_form(cfg, OmegaConf.to_container(dot)), source, dot)
        origins.update(dict.fromkeys(_flat_keys(OmegaConf.to_container(dot)), source))
    _expand_stages(cfg, origins)
    problems = validate_config(cfg, origins)
    if problems:
        raise ConfigError("\n".join(problems))
    OmegaConf.set_readonly(cfg, True)
    return cfg  # type: ignore[return-value]


def _clear_other_form(cfg: DictConfig, data: dict) -> DictConfig:
    """A later source that gives the stages in one form replaces an earlier source's other
    form (a file's ``pipeline.train`` and a command line's ``pipeline.stages``)."""
    pipeline = data.get("pipeline") if isinstance(data, dict) else None
    if isinstance(pipeline, dict):
        if "stages" in pipeline and "train" not in pipeline:
            cfg.pipeline.train = None
        if "train" in pipeline and "stages" not in pipeline:
            cfg.pipeline.stages = None
    return cfg


def _expand_stages(cfg: DictConfig, origins: dict[str, str]) -> None:
    """Replace the stage shorthands by the explicit ``pipeline.stages`` list (in place)."""
    pc = cfg.pipeline
    source = origins.get("pipeline.stages") or origins.get("pipeline.train")
    source = source or origins.get("pipeline.finetune_teacher") or "defaults"
    try:
        stages = expand_stages(cfg)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    try:
        pc.stages = stages
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: invalid 'pipeline.stages': {_first_line(err)}") from None
    pc.train = None
    pc.finetune_teacher = False
    origins.setdefault("pipeline.stages", source)


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the fully resolved config (enough to reproduce the run)."""
    from raykd.atomic import atomic_write_text

    atomic_write_text(Path(path), OmegaConf.to_yaml(cfg, resolve=True))


def split_seed(cfg) -> int:
    """The seed of the data split and order: ``data.split_seed``, else ``run.seed``."""
    return cfg.run.seed if cfg.data.split_seed is None else cfg.data.split_seed
