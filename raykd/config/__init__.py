"""Run configuration: structured schema, YAML + dotlist loading, validation."""

from raykd.config.load import ConfigError, load_config, save_config, split_seed
from raykd.config.schema import RunConfig

__all__ = ["ConfigError", "RunConfig", "load_config", "save_config", "split_seed"]
