"""Checks of an RL run's config that only the RL command needs (other commands leave the RL keys at defaults)."""

from __future__ import annotations

from maxtext.configs import Config, ConfigError


def check_rl_config(config: Config) -> None:
  if not config.rl_train_files.strip():
    raise ConfigError("config key 'rl_train_files' is empty: name jsonl or parquet files of prompt/label rows")
  if config.max_response_length >= config.max_target_length:
    raise ConfigError(
        f"config key 'max_response_length' ({config.max_response_length}) must be below max_target_length"
        f" ({config.max_target_length}): each prompt + response must fit in one row"
    )
