"""Tokenising records: pretraining text (documents end with the end-of-text token) and SFT conversations (the
chat template; only assistant replies are trained on).

Each encoder returns a document's token ids and per-token loss weights; `to_example` turns them into the model's
(inputs, targets, loss_mask) by the one-token shift.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from maxtext.configs import Config, ConfigError


def load_tokenizer(config: Config):
  """transformers' AutoTokenizer on `tokenizer_path`, or the model family's shipped tokenizer (Qwen3 / Qwen3.6) when
  it is empty."""
  from transformers import AutoTokenizer  # noqa: PLC0415 - slow import, only pipelines with files need it

  path = config.tokenizer_path
  if not path:
    from maxtext.assets.tokenizers import ensure_family_tokenizer  # noqa: PLC0415

    path = ensure_family_tokenizer(config.model_family)
  elif not os.path.isdir(path):
    raise ConfigError(f"config key 'tokenizer_path': '{path}' does not exist or is not a directory")
  try:
    return AutoTokenizer.from_pretrained(path)
  except (OSError, ValueError) as e:
    raise ConfigError(f"config key 'tokenizer_path': cannot load a tokenizer from '{path}': {str(e)[:200]}") from None


def end_of_text_id(tokenizer) -> int:
  """The token that separates pretraining documents: '<|endoftext|>' where the vocabulary has it, else EOS."""
  token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
  if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id is not None:
    return token_id
  if tokenizer.eos_token_id is None:
    raise ConfigError("the tokenizer has neither '<|endoftext|>' nor an EOS token; set add_eos=false")
  return tokenizer.eos_token_id


def _column(record: dict[str, Any], column: str) -> Any:
  if column not in record:
    raise ConfigError(
        f"config key 'train_data_columns': a record has no column '{column}' (it has {', '.join(map(str, record))})"
    )
  return record[column]


class PretrainEncoder:
  """record -> (ids, weights): the text columns joined by newlines, then end-of-text; every token is trained."""

  def __init__(self, tokenizer, columns: list[str], add_eos: bool, vocab_size: int):
    self._tokenizer = tokenizer
    self._columns = columns
    self._eos = end_of_text_id(tokenizer) if add_eos else None
    self._vocab_size = vocab_size

  def __call__(self, record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    text = "\n".join(str(_column(record, c)) for c in self._columns)
    ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
    if self._eos is not None:
      ids = ids + [self._eos]
    ids = check_vocabulary(np.asarray(ids, np.int32), self._vocab_size)
    return ids, np.ones(len(ids), np.float32)


class SftEncoder:
  """record -> (ids, weights) of a conversation (`messages`: a list of {role, content}) rendered by the tokenizer's
  chat template. With `completion_only` only the assistant replies and the end-of-turn token after each are
  trained; the template's framing (role headers, empty think blocks) and other turns get weight 0."""

  def __init__(self, tokenizer, column: str, completion_only: bool, vocab_size: int):
    if not getattr(tokenizer, "chat_template", None):
      raise ConfigError("use_sft=true needs a tokenizer with a chat template (tokenizer_path)")
    self._tokenizer = tokenizer
    self._column = column
    self._completion_only = completion_only
    self._vocab_size = vocab_size
    self._special = sorted((str(t) for t in tokenizer.all_special_tokens), key=len, reverse=True)

  def __call__(self, record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    messages = _column(record, self._column)
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
      raise ConfigError(f"use_sft=true: column '{self._column}' must hold a list of {{role, content}} messages")
    text = self._tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = check_vocabulary(np.asarray(encoded["input_ids"], np.int32), self._vocab_size)
    if not self._completion_only:
      return ids, np.ones(len(ids), np.float32)
    spans = self._assistant_spans(text, messages)
    weights = np.zeros(len(ids), np.float32)
    for i, (start, end) in enumerate(encoded["offset_mapping"]):
      weights[i] = any(start < hi and end > lo for lo, hi in spans)
    return ids, weights

  def _assistant_spans(self, text: str, messages: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Character spans of each assistant reply plus the special token (end of turn) right after it."""
    spans, cursor = [], 0
    for message in messages:
      content = str(message.get("content") or "")
      found = text.find(content, cursor) if content else -1
      if found < 0:
        continue
      end = found + len(content)
      cursor = end
      if message["role"] == "assistant":
        closing = next((s for s in self._special if text.startswith(s, end)), "")
        spans.append((found, end + len(closing)))
    return spans


def check_vocabulary(ids: np.ndarray, vocab_size: int) -> np.ndarray:
  if ids.size and int(ids.max()) >= vocab_size:
    raise ConfigError(
        f"the tokenizer produced token id {int(ids.max())}, outside the model's vocabulary (vocab_size={vocab_size}):"
        " use a tokenizer that fits the model (tokenizer_path) or a model with a larger vocab_size"
    )
  return ids


def to_example(ids: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
  """Token ids of one document -> inputs ids[:-1], targets ids[1:], loss weight of each target."""
  return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": weights[1:]}
