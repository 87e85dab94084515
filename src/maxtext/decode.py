"""Continue a prompt with the model and print the generated text as it streams.

  python3 -m maxtext.decode src/maxtext/configs/base.yml load_parameters_path=... tokenizer_path=... \
      per_device_batch_size=1 max_prefill_predict_length=64 max_target_length=1024 prompt="I love to" \
      scan_layers=false

Without load_parameters_path the parameters are random (the text is then garbage, as in MaxText). The batch holds
per_device_batch_size x devices copies of the prompt (each with its own sampling seed).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import jax

from maxtext.configs import Config, ConfigError, load_config
from maxtext.inference.engine import Engine
from maxtext.inference.sampling import SamplingParams
from maxtext.inference.tokenizer import encode_for, load_tokenizer, stop_token_ids
from maxtext.utils import cli, distributed


def sampling_params(config: Config, prompt_length: int, tokenizer, seed: int) -> SamplingParams:
  """MaxText's decode_sampling_* keys -> SamplingParams for one request."""
  strategy = config.decode_sampling_strategy
  temperature = 0.0 if strategy == "greedy" else config.decode_sampling_temperature
  if config.decode_stop_token_ids == "auto":
    stops = stop_token_ids(tokenizer)
  elif config.decode_stop_token_ids == "none":
    stops = ()
  else:
    stops = tuple(int(t) for t in config.decode_stop_token_ids.split(","))
  room = config.max_target_length - prompt_length
  new_tokens = room if config.decode_max_new_tokens < 0 else min(config.decode_max_new_tokens, room)
  return SamplingParams(
      max_tokens=new_tokens,
      temperature=temperature,
      top_k=config.decode_sampling_top_k if strategy == "topk" else 0,
      top_p=config.decode_sampling_nucleus_p if strategy == "nucleus" else 1.0,
      min_p=0.0 if strategy == "greedy" else config.decode_sampling_min_p,
      presence_penalty=config.decode_presence_penalty,
      stop_token_ids=stops,
      seed=seed,
  )


def main(argv: Sequence[str]) -> int:
  config = load_config(argv)
  distributed.initialize(config, mesh_spans_processes=False)  # several processes: each decodes on its own devices
  tokenizer = load_tokenizer(config)
  prompt_ids = encode_for(config, tokenizer, config.prompt)
  if not prompt_ids:
    raise ConfigError("config key 'prompt' is empty: give the text to continue")
  if len(prompt_ids) >= config.max_target_length:
    raise ConfigError(
        f"the prompt has {len(prompt_ids)} tokens, which leaves no room below max_target_length"
        f" ({config.max_target_length})"
    )
  # The engine feeds one process's devices: launched as several processes (a TPU slice of several hosts), each
  # decodes on its own devices (the model must fit one host) and process 0 prints.
  devices = jax.local_devices()
  say = print if jax.process_index() == 0 else (lambda *args, **kwargs: None)
  batch = max(1, int(config.per_device_batch_size * len(devices)))
  start = time.perf_counter()
  engine = Engine(config, devices=devices)
  say(f"model {config.model_name} ready in {time.perf_counter() - start:.1f}s; prompt {len(prompt_ids)} tokens,"
      f" batch {batch}", file=sys.stderr)
  requests = [sampling_params(config, len(prompt_ids), tokenizer, config.decode_sampling_seed + i) for i in range(batch)]
  generated: list[list[int]] = [[] for _ in range(batch)]
  say(f"Input `{config.prompt}` -> `", end="", flush=True)
  start = time.perf_counter()
  first_token_s = None
  printed = ""
  for event in engine.generate([prompt_ids] * batch, requests):
    first_token_s = first_token_s or time.perf_counter() - start
    generated[event.request].append(event.token_id)
    if event.request == 0:
      # Decode the whole continuation each time: a character may span several tokens.
      text = tokenizer.decode(generated[0], skip_special_tokens=True)
      say(text[len(printed):], end="", flush=True)
      printed = text
  elapsed = time.perf_counter() - start
  say("`")
  for row in range(1, batch):
    say(f"[{row}] `{tokenizer.decode(generated[row], skip_special_tokens=True)}`")
  total = sum(map(len, generated))
  say(f"{total} tokens in {elapsed:.2f}s (first token after {first_token_s or 0:.2f}s, including compilation)",
      file=sys.stderr)
  return 0


if __name__ == "__main__":
  cli.run(main)
