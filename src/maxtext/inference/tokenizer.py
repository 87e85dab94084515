"""The tokenizer of a decode or serving run: transformers' AutoTokenizer on `tokenizer_path`, else the shipped
tokenizer asset of the model family (Qwen3's, or Qwen3.6's for qwen3_5_moe; built offline on first use)."""

from __future__ import annotations

import json
import os

from maxtext.configs import Config, ConfigError


def load_tokenizer(config: Config):
  """A transformers tokenizer for `config` (tokenizer_type=huggingface); one clear line when it cannot load."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything runs offline; must precede the transformers import
  from transformers import AutoTokenizer  # noqa: PLC0415 - slow import, only when a tokenizer is needed

  from maxtext.assets.tokenizers import ensure_family_tokenizer  # noqa: PLC0415

  path = config.tokenizer_path or ensure_family_tokenizer(config.model_family)
  if not os.path.isdir(path):
    raise ConfigError(f"config key 'tokenizer_path': '{path}' is not a directory (a folder AutoTokenizer can load)")
  try:
    tokenizer = AutoTokenizer.from_pretrained(path)
  except (OSError, ValueError) as e:
    raise ConfigError(f"config key 'tokenizer_path': cannot load a tokenizer from '{path}': {e}") from None
  return tokenizer


def encode_for(config: Config, tokenizer, text: str) -> list[int]:
  """Token ids of `text`, checked against the model's vocabulary (ids past it would index out of the embedding)."""
  ids = tokenizer.encode(text)
  if ids and max(ids) >= config.vocab_size:
    raise ConfigError(
        f"the tokenizer gives token id {max(ids)}, outside the model's vocabulary (vocab_size={config.vocab_size});"
        f" a random model for this {len(tokenizer)}-token tokenizer needs vocab_size={len(tokenizer)} or more"
    )
  return ids


def stop_token_ids(tokenizer) -> tuple[int, ...]:
  """The ids that end a generation by default: the tokenizer's eos, for chat models <|im_end|>, and the eos ids of
  a `generation_config.json` beside the tokenizer (Qwen3.6: config eos 248044 besides tokenizer eos 248046)."""
  ids = set()
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
  if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end is not None:
    ids.add(im_end)
  ids.update(_generation_config_eos(getattr(tokenizer, "name_or_path", "")))
  return tuple(sorted(ids))


def _generation_config_eos(folder: str) -> list[int]:
  path = os.path.join(folder, "generation_config.json") if folder else ""
  if not path or not os.path.isfile(path):
    return []
  try:
    with open(path, encoding="utf-8") as f:
      eos = json.load(f).get("eos_token_id")
  except (OSError, ValueError, AttributeError):
    return []
  eos = [eos] if isinstance(eos, int) else eos
  return [int(t) for t in eos or () if isinstance(t, int)]
