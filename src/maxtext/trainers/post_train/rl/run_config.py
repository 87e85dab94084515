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
  if config.mtp_speculative_decoding and config.rl_temperature > 0:
    # The engine speculates for greedy requests only; sampled rollouts decode plainly (said once, not silently).
    import logging  # noqa: PLC0415

    logging.getLogger("maxtext.rl").info(
        "mtp_speculative_decoding: the engine speculates for greedy requests only; sampled rollouts"
        " (rl_temperature=%g) decode plainly", config.rl_temperature)
