"""RL prompts: rows of jsonl or parquet files with `prompt` (a string or chat messages) and `label`, tokenised once,
served in shuffled epochs by an iterator whose position the checkpoint keeps."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any

import numpy as np

from maxtext.configs import Config, ConfigError
from maxtext.input_pipeline.sources import DataFileError

_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class Prompt:
  tokens: tuple[int, ...]
  label: str
  where: str  # file:row, for messages about this prompt


def data_files(patterns: str, key: str) -> list[str]:
  files: list[str] = []
  for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
    matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not matches:
      raise ConfigError(f"config key '{key}': no file matches '{pattern}'")
    files.extend(matches)
  if not files:
    raise ConfigError(f"config key '{key}' is empty: name jsonl or parquet files of prompt/label rows")
  for path in files:
    if os.path.splitext(path)[1] not in _KINDS:
      raise ConfigError(f"config key '{key}': '{path}' is not a .jsonl, .json or .parquet file")
  return files


def _rows(path: str) -> list[dict[str, Any]]:
  if _KINDS[os.path.splitext(path)[1]] == "parquet":
    try:
      import pyarrow.parquet as pq  # noqa: PLC0415 - only parquet needs it
    except ImportError:
      raise ConfigError("parquet RL files need pyarrow: pip install pyarrow") from None
    try:
      return pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError...
      raise DataFileError(f"'{path}' is not a readable parquet file: {str(e)[:200]}") from None
  rows = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataFileError(f"'{path}' line {number} is not valid JSON: {e.msg}") from None
      if not isinstance(row, dict):
        raise DataFileError(f"'{path}' line {number} is not a JSON object")
      rows.append(row)
  return rows


def _prompt_tokens(prompt: Any, tokenizer, where: str) -> list[int]:
  if isinstance(prompt, str):
    return list(tokenizer.encode(prompt))
  if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
    if not getattr(tokenizer, "chat_template", None):
      raise ConfigError(f"{where}: the prompt is chat messages but the tokenizer has no chat template")
    ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
  raise DataFileError(f"{where}: 'prompt' must be a string or a list of chat messages ({{role, content}})")


def load_prompts(config: Config, tokenizer, patterns: str, key: str) -> list[Prompt]:
  """Every row of the files `patterns` names, checked and tokenised; the prompt plus max_response_length tokens
  must fit in max_target_length."""
  prompts = []
  for path in data_files(patterns, key):
    for index, row in enumerate(_rows(path)):
      where = f"'{path}' row {index + 1}"
      missing = [column for column in ("prompt", "label") if row.get(column) is None]
      if missing:
        raise DataFileError(f"{where} has no '{missing[0]}' (RL rows need 'prompt' and 'label'; it has"
                            f" {', '.join(sorted(row)) or 'nothing'})")
      tokens = _prompt_tokens(row["prompt"], tokenizer, where)
      if not tokens:
        raise DataFileError(f"{where}: the prompt is empty")
      if max(tokens) >= config.vocab_size:
        raise ConfigError(f"{where}: token id {max(tokens)} is outside the model's vocabulary"
                          f" (vocab_size={config.vocab_size})")
      if len(tokens) + config.max_response_length > config.max_target_length:
        raise ConfigError(
            f"{where}: {len(tokens)} prompt tokens + max_response_length ({config.max_response_length}) exceed"
            f" max_target_length ({config.max_target_length})"
        )
      prompts.append(Prompt(tuple(tokens), str(row["label"]), where))
  return prompts


class PromptIterator:
  """Prompts in a new shuffled order each epoch (seed, epoch); `get_state`/`set_state` for the checkpoint."""

  def __init__(self, prompts: list[Prompt], seed: int, shuffle: bool = True):
    self._prompts, self._seed, self._shuffle = prompts, seed, shuffle
    self._epoch, self._position = 0, 0
    self._order = self._order_of(0)

  def _order_of(self, epoch: int) -> np.ndarray:
    order = np.arange(len(self._prompts))
    if self._shuffle:
      np.random.default_rng([self._seed, epoch]).shuffle(order)
    return order

  def take(self, count: int) -> list[Prompt]:
    taken = []
    while len(taken) < count:
      if self._position == len(self._order):
        self._epoch, self._position = self._epoch + 1, 0
        self._order = self._order_of(self._epoch)
      taken.append(self._prompts[self._order[self._position]])
      self._position += 1
    return taken

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self._epoch, "position": self._position, "num_prompts": len(self._prompts)}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("num_prompts") != len(self._prompts):
      raise ConfigError(f"the checkpoint's data iterator read {state.get('num_prompts')} prompts, rl_train_files now"
                        f" has {len(self._prompts)}: resume with the same files")
    self._epoch, self._position = int(state["epoch"]), int(state["position"])
    self._order = self._order_of(self._epoch)
