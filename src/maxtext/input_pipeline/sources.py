"""Random-access record sources over local files (what grain's MapDataset indexes): jsonl, parquet, ArrayRecord.

A record is a dict of columns. Opening a source reads only indexes (line offsets, row-group sizes), not the data.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

from maxtext.configs import ConfigError


class DataFileError(OSError):
  """A data file that cannot be read as its declared format; the message names the file (and line)."""


class JsonlSource:
  """One JSON object per non-empty line."""

  def __init__(self, files: Sequence[str]):
    self._files = list(files)
    self._offsets: list[tuple[int, int, int]] = []  # (file index, byte offset, line number)
    for index, path in enumerate(self._files):
      with open(path, "rb") as f:
        offset = 0
        for line_number, line in enumerate(f, start=1):
          if line.strip():
            self._offsets.append((index, offset, line_number))
          offset += len(line)
    if not self._offsets:
      raise DataFileError(f"no records in {', '.join(self._files)}")

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, record: int) -> dict[str, Any]:
    index, offset, line_number = self._offsets[record]
    path = self._files[index]
    with open(path, "rb") as f:
      f.seek(offset)
      line = f.readline()
    try:
      value = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataFileError(f"'{path}' line {line_number} is not valid JSON: {e.msg}") from None
    if not isinstance(value, dict):
      raise DataFileError(f"'{path}' line {line_number} is not a JSON object")
    return value


class ParquetSource:
  """Rows of parquet files, read one row group at a time (the last one is cached)."""

  def __init__(self, files: Sequence[str], columns: Sequence[str]):
    try:
      import pyarrow.parquet as pq  # noqa: PLC0415 - only parquet needs it
    except ImportError:
      raise ConfigError("grain_file_type=parquet needs pyarrow: pip install pyarrow") from None
    self._pq = pq
    self._files = list(files)
    self._columns = list(columns)
    self._groups: list[tuple[int, int]] = []  # (file index, row group)
    self._starts: list[int] = []
    total = 0
    for index, path in enumerate(self._files):
      try:
        metadata = pq.ParquetFile(path).metadata
      except Exception as e:  # pyarrow raises ArrowInvalid, OSError...
        raise DataFileError(f"'{path}' is not a readable parquet file: {str(e)[:200]}") from None
      missing = [c for c in self._columns if c not in metadata.schema.names]
      if missing:
        raise ConfigError(f"config key 'train_data_columns': '{path}' has no column '{missing[0]}'"
                          f" (it has {', '.join(metadata.schema.names)})")
      for group in range(metadata.num_row_groups):
        self._groups.append((index, group))
        self._starts.append(total)
        total += metadata.row_group(group).num_rows
    self._length = total

  def __len__(self) -> int:
    return self._length

  @functools.lru_cache(maxsize=1)  # noqa: B019 - one cached group per source is the point
  def _group(self, group: int) -> list[dict[str, Any]]:
    index, row_group = self._groups[group]
    table = self._pq.ParquetFile(self._files[index]).read_row_group(row_group, columns=self._columns)
    return table.to_pylist()

  def __getitem__(self, record: int) -> dict[str, Any]:
    group = bisect.bisect_right(self._starts, record) - 1
    return self._group(group)[record - self._starts[group]]


class ArrayRecordSource:
  """ArrayRecord files whose records are UTF-8 JSON objects, or plain UTF-8 text (read as `text_column`)."""

  def __init__(self, files: Sequence[str], text_column: str):
    try:
      from grain.sources import ArrayRecordDataSource  # noqa: PLC0415
    except ImportError:
      raise ConfigError("grain_file_type=arrayrecord needs grain and array_record: pip install grain") from None
    for path in files:
      if os.path.getsize(path) == 0:
        raise DataFileError(f"'{path}' is empty, not an ArrayRecord file")
    try:
      self._source = ArrayRecordDataSource(list(files))
    except Exception as e:
      raise DataFileError(f"cannot open ArrayRecord files {list(files)[:3]}: {str(e)[:200]}") from None
    self._text_column = text_column

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, record: int) -> dict[str, Any]:
    data = self._source[record]
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError:
      raise DataFileError(f"ArrayRecord record {record} is neither UTF-8 JSON nor UTF-8 text") from None
    if text.lstrip().startswith("{"):
      try:
        value = json.loads(text)
        if isinstance(value, dict):
          return value
      except json.JSONDecodeError:
        pass
    return {self._text_column: text}


def open_source(files: Sequence[str], file_type: str, columns: Sequence[str]):
  if file_type == "jsonl":
    return JsonlSource(files)
  if file_type == "parquet":
    return ParquetSource(files, columns)
  if file_type == "arrayrecord":
    return ArrayRecordSource(files, columns[0])
  raise ConfigError(f"config key 'grain_file_type' must be jsonl, parquet or arrayrecord, got '{file_type}'")
