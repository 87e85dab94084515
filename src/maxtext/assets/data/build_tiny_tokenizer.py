"""Build the byte-level BPE tokenizer of the tiny model (vocabulary 512, learnt from corpus.jsonl and chat.jsonl).

  python3 -m maxtext.assets.data.build_tiny_tokenizer [--output-dir DIR]

The Qwen3 tokenizer's ids reach 151668, beyond the tiny model's vocab_size of 512; this one fits it and keeps the
Qwen special tokens and chat template, so pretraining and SFT runs of the tiny model use real text on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
TINY_TOKENIZER_DIR = os.path.join(DATA_DIR, "tiny-tokenizer")
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def _texts():
  with open(os.path.join(DATA_DIR, "corpus.jsonl"), encoding="utf-8") as f:
    for line in f:
      yield json.loads(line)["text"]
  with open(os.path.join(DATA_DIR, "chat.jsonl"), encoding="utf-8") as f:
    for line in f:
      for message in json.loads(line)["messages"]:
        yield f"{message['role']}\n{message['content']}"


def build(output_dir: str = TINY_TOKENIZER_DIR) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
  from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

  from maxtext.assets.tokenizers import ensure_qwen3_tokenizer  # noqa: PLC0415

  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=VOCAB_SIZE,
      special_tokens=SPECIAL_TOKENS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tokenizer.train_from_iterator(_texts(), trainer)
  with open(os.path.join(ensure_qwen3_tokenizer(), "chat_template.jinja"), encoding="utf-8") as f:
    chat_template = f.read()
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=chat_template
  )
  fast.save_pretrained(output_dir)
  return output_dir


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output-dir", default=TINY_TOKENIZER_DIR)
  print(f"wrote {build(parser.parse_args().output_dir)}")


if __name__ == "__main__":
  main()
