"""The toy verifiable task of the RL tests: copy the digit of the prompt ("7=" -> "7", or "\\boxed{7}").

A 16-token word-level tokenizer (one token per digit) keeps the tiny model's vocabulary at 16, so a random policy
hits the right digit about 1 time in 10 and GRPO / GSPO have signal from the first step.
"""

from __future__ import annotations

import json
import os

DIGITS = [str(d) for d in range(10)]
VOCAB = ["<|endoftext|>", "<|im_end|>", *DIGITS, "=", "\\boxed{", "}", " "]


def build_tokenizer(directory: str) -> str:
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<|endoftext|>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|."), behavior="isolated")
  tokenizer.decoder = decoders.Fuse()
  fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
  fast.save_pretrained(directory)
  return directory


def write_rows(path: str, digits: list[int]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for digit in digits:
      f.write(json.dumps({"prompt": f"{digit}=", "label": str(digit)}) + "\n")
  return path


def build_task(directory: str) -> dict[str, str]:
  """Tokenizer and train / eval files under `directory` -> the config keys that use them."""
  os.makedirs(directory, exist_ok=True)
  return {
      "tokenizer_path": build_tokenizer(os.path.join(directory, "tokenizer")),
      "rl_train_files": write_rows(os.path.join(directory, "train.jsonl"), list(range(10)) * 4),
      "rl_eval_files": write_rows(os.path.join(directory, "eval.jsonl"), list(range(10))),
  }


# The tiny model at the toy task's size: 16 tokens, short rows, float32 everywhere.
TOY_MODEL = {
    "vocab_size": 16, "base_num_decoder_layers": 4, "mtp_num_layers": 0, "max_target_length": 32,
    "max_prefill_predict_length": 16, "dtype": "float32", "weight_dtype": "float32", "remat_policy": "none",
    "per_device_batch_size": 8, "max_response_length": 2, "num_generations": 8, "rollout_batch_size": 8,
    "decode_stop_token_ids": "auto", "enable_checkpointing": False, "enable_tensorboard": False,
}


def length_reward(response: str, label: str) -> float:
  """A user reward function (module:function) for the tests: the response's length."""
  return float(len(response))
