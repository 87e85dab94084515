"""Fixtures of the server tests: the Qwen3 tokenizer, a server over a scripted engine (unit level), and the real
server CLI over a tiny converted HF checkpoint (acceptance)."""

from __future__ import annotations

import pytest

from tests.serving.live_server import fake_server

SCRIPT_TEXT = " one two three four five six seven eight nine ten"


@pytest.fixture(scope="session")
def tokenizer():
  from transformers import AutoTokenizer

  from maxtext.assets.tokenizers import ensure_qwen3_tokenizer

  return AutoTokenizer.from_pretrained(ensure_qwen3_tokenizer())


def _script(tokenizer) -> list[int]:
  return tokenizer.encode(SCRIPT_TEXT) + [tokenizer.convert_tokens_to_ids("<|endoftext|>")]


@pytest.fixture(scope="module")
def fake(tokenizer):
  """A real uvicorn server in a thread over the scripted engine, with a short gather window (each request waits
  it out, so a long one would slow every test)."""
  with fake_server(tokenizer, _script(tokenizer), window_s=0.05) as server:
    yield server


@pytest.fixture()
def fake_wide_window(tokenizer):
  """As `fake`, with a gather window long enough that requests sent together from threads land in one batch even
  on a loaded 2-core machine (0.1 s was seen to split them)."""
  with fake_server(tokenizer, _script(tokenizer), window_s=0.5) as server:
    yield server


@pytest.fixture(scope="session")
def real():
  from tests.serving.live_server import tiny_checkpoint_server

  return tiny_checkpoint_server()
