"""Configuration: YAML + `key=value` overrides -> one frozen, validated `Config`."""

from maxtext.configs.loader import ConfigError, load_config, parse_cli
from maxtext.configs.types import Config

__all__ = ["Config", "ConfigError", "load_config", "parse_cli"]
