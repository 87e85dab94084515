"""Serve a model over an OpenAI-compatible HTTP API (completions, chat, models).

  python3 -m maxtext.serving.server src/maxtext/configs/base.yml load_parameters_path=OUT/0/items \
      server_host=127.0.0.1 server_port=8000 [served_model_name=qwen3-next] [key=value ...]

Parameters come from `load_parameters_path` (random when empty: smoke tests only); prompts and generations must fit
in `max_target_length` tokens. Requests join the running batch as rows free up (`server_continuous_batching`,
`server_max_batch_size` rows, prompts prefilled `prefill_chunk_size` tokens at a time) and reuse cached prefixes
(`enable_prefix_caching`, `prefix_cache_bytes`); `server_continuous_batching=false` batches whole requests
instead (`server_batch_window_ms`). Binds 127.0.0.1 by default: pass server_host=0.0.0.0 to listen on every interface.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from maxtext.configs import ConfigError, load_config
from maxtext.configs.types import Config
from maxtext.serving.app import build_app
from maxtext.serving.batcher import Batcher
from maxtext.serving.continuous_batcher import ContinuousBatcher
from maxtext.serving.served_model import ServedModel
from maxtext.utils import cli

log = logging.getLogger("maxtext.serving")


def served_model_id(config: Config) -> str:
  if config.served_model_name:
    return config.served_model_name
  return "qwen3-next" if config.model_name == "auto" else config.model_name


def load_served_model(config: Config) -> ServedModel:
  """Tokenizer + Engine (parameters loaded or initialised) behind a Batcher."""
  from maxtext.inference.engine import Engine  # noqa: PLC0415 - imports jax and the model
  from maxtext.inference.sampling import SamplingParams  # noqa: PLC0415
  from maxtext.inference.scheduler import Scheduler  # noqa: PLC0415
  from maxtext.inference.tokenizer import load_tokenizer  # noqa: PLC0415

  tokenizer = load_tokenizer(config)
  if len(tokenizer) > config.vocab_size:
    # Most text would hold ids the model has no embedding for: every such request would fail.
    raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but config key 'vocab_size' is {config.vocab_size}:"
                      f" serve a checkpoint made for this tokenizer (or, for a random model, set"
                      f" vocab_size={len(tokenizer)} or more)")
  start = time.perf_counter()
  engine = Engine(config)
  log.info("engine ready in %.1fs (max context %d tokens)", time.perf_counter() - start, engine.max_context)
  batching = dict(window_s=config.server_batch_window_ms / 1000.0, max_batch=config.server_max_batch_size,
                  timeout_s=config.server_request_timeout_s, invariant_scoring=config.server_batch_invariant_scoring)
  if config.server_continuous_batching:
    cache_bytes = config.prefix_cache_bytes if config.enable_prefix_caching else 0
    scheduler = Scheduler(engine, rows=config.server_max_batch_size, chunk=config.prefill_chunk_size,
                          prefix_cache_bytes=cache_bytes)
    batcher = ContinuousBatcher(engine, scheduler, **batching)
  else:
    batcher = Batcher(engine, **batching)
  return ServedModel(batcher, tokenizer, served_model_id(config), engine.max_context, config.vocab_size,
                     SamplingParams, max_prompts_per_request=config.server_max_prompts_per_request,
                     tokenize_timeout_s=config.server_tokenize_timeout_s,
                     allow_client_chat_template=config.server_allow_client_chat_template)


def main(argv: Sequence[str]) -> int:
  import uvicorn  # noqa: PLC0415

  config = load_config(argv)
  model = load_served_model(config)
  log.info("serving '%s' on http://%s:%d/v1", model.model_id, config.server_host, config.server_port)
  app = build_app(model, api_key=config.server_api_key, max_body_bytes=config.server_max_body_bytes)
  uvicorn.run(app, host=config.server_host, port=config.server_port, log_level="info")
  return 0


if __name__ == "__main__":
  cli.run(main)
