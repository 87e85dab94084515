"""Fixtures of the evaluator tests (the server fixtures are shared with tests/serving)."""

from __future__ import annotations

import pytest

from tests.serving.live_server import fake_server


@pytest.fixture(scope="session")
def tokenizer():
  from transformers import AutoTokenizer

  from maxtext.assets.tokenizers import ensure_qwen3_tokenizer

  return AutoTokenizer.from_pretrained(ensure_qwen3_tokenizer())


@pytest.fixture(scope="module")
def fake(tokenizer):
  with fake_server(tokenizer, tokenizer.encode(" A B C D"), window_s=0.02, max_context=512) as server:
    yield server


@pytest.fixture(scope="session")
def real():
  from tests.serving.live_server import tiny_checkpoint_server

  return tiny_checkpoint_server()
