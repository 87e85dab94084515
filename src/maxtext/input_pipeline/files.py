"""Which local files a run reads: `grain_train_files` patterns, or a HF-style dataset directory."""

from __future__ import annotations

import glob
import os

from maxtext.configs import Config, ConfigError

_HF_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def _expand(patterns: list[str], key: str) -> list[str]:
  files: list[str] = []
  for pattern in patterns:
    matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not matches:
      raise ConfigError(f"config key '{key}': no file matches '{pattern}'")
    files.extend(matches)
  return files


def grain_files(config: Config) -> tuple[list[str], str]:
  """(files, file type) of dataset_type=grain: comma-separated globs, relative to dataset_path when it is set."""
  patterns = [p.strip() for p in config.grain_train_files.split(",") if p.strip()]
  if config.dataset_path:
    if not os.path.isdir(config.dataset_path):
      raise ConfigError(f"config key 'dataset_path': '{config.dataset_path}' is not a directory")
    patterns = [os.path.join(config.dataset_path, p) for p in patterns]
  return _expand(patterns, "grain_train_files"), config.grain_file_type


def hf_files(config: Config) -> tuple[list[str], str]:
  """(files, file type) of dataset_type=hf: hf_path[/hf_data_dir] holds jsonl or parquet files (a local copy of a
  hub dataset); hf_train_files narrows them with a glob relative to that directory."""
  root = os.path.join(config.hf_path, config.hf_data_dir) if config.hf_data_dir else config.hf_path
  if not os.path.isdir(root):
    key = "hf_data_dir" if config.hf_data_dir and os.path.isdir(config.hf_path) else "hf_path"
    raise ConfigError(f"config key '{key}': '{root}' is not a directory (only local datasets are supported here)")
  if config.hf_train_files:
    files = _expand([os.path.join(root, p.strip()) for p in config.hf_train_files.split(",") if p.strip()],
                    "hf_train_files")
  else:
    files = sorted(
        os.path.join(d, f) for d, _, names in os.walk(root) for f in names if os.path.splitext(f)[1] in _HF_EXTENSIONS
    )
    if not files:
      raise ConfigError(f"config key 'hf_path': no .jsonl, .json or .parquet file under '{root}'")
  kinds = {_HF_EXTENSIONS.get(os.path.splitext(f)[1]) for f in files}
  if None in kinds or len(kinds) != 1:
    raise ConfigError(f"config key 'hf_train_files': the files under '{root}' must all be jsonl or all parquet")
  return files, kinds.pop()
