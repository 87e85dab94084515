"""/tokenizer_info, /tokenize, /detokenize as lm-eval's remote tokenizer calls them (and vLLM answers)."""

from __future__ import annotations

import json
import urllib.request

from tests.serving.test_api import post


def test_tokenizer_info_names_the_special_tokens_and_template(fake, tokenizer):
  with urllib.request.urlopen(f"{fake[0]}/tokenizer_info", timeout=30) as response:
    info = json.loads(response.read())
  assert info["eos_token"] == tokenizer.eos_token and info["chat_template"] == tokenizer.chat_template
  assert info["max_model_len"] == fake[2].max_context


def test_tokenize_and_detokenize_round_trip(fake, tokenizer):
  text = "Who said it?\u0085 鱻 <|endoftext|>"
  status, answer = post(fake[0], "/tokenize", {"prompt": text, "add_special_tokens": False})
  assert status == 200 and answer["tokens"] == tokenizer.encode(text, add_special_tokens=False)
  assert answer["count"] == len(answer["tokens"])
  # lm-eval reads eos_token_id as the first id of tokenize(eos_token): the special token itself.
  assert post(fake[0], "/tokenize", {"prompt": tokenizer.eos_token})[1]["tokens"] == [tokenizer.eos_token_id]
  status, answer = post(fake[0], "/detokenize", {"tokens": answer["tokens"]})
  assert status == 200 and answer == {"prompt": text}


def test_bad_tokenizer_requests_are_400(fake, tokenizer):
  status, answer = post(fake[0], "/detokenize", {"tokens": [len(tokenizer)]})
  assert status == 400 and answer["error"]["param"] == "tokens"
  status, answer = post(fake[0], "/tokenize", {"prompt": "x" * 1_000_000})
  assert status == 400 and "could ever fit" in answer["error"]["message"]
  status, answer = post(fake[0], "/tokenize", {"text": "x"})
  assert status == 400
  assert post(fake[0], "/tokenize", {"prompt": "x", "model": "other"})[0] == 404
