"""Golden logits from HF transformers, one JSON line per prompt.

  python3 -m tests.assets.logits_generation.generate_hf_golden_logits --model-id=HF_DIR \
      --output-path=golden.jsonl --prompts='I love to;Today is a;What is the'

Each line: prompt, token ids, logits [T, vocab] (float32 values), and what is needed to rerun (model, dtype,
tokenizer, library versions). Runs offline: --model-id must be a local directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _tokenizer_dir(model_dir: str, tokenizer_path: str | None) -> str:
  if tokenizer_path:
    return tokenizer_path
  if any(os.path.isfile(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
    return model_dir
  from maxtext.assets.tokenizers import ensure_family_tokenizer

  return str(ensure_family_tokenizer(_model_family(model_dir)))


def _model_family(model_dir: str) -> str:
  """qwen3_5_moe for a Qwen3.5 / 3.6 folder (its shipped tokenizer is Qwen3.6's), else qwen3_next."""
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    return "qwen3_next"
  with open(path, encoding="utf-8") as f:
    model_type = json.load(f).get("model_type", "")
  return "qwen3_5_moe" if str(model_type).startswith("qwen3_5_moe") else "qwen3_next"


def generate(model_dir: str, prompts: list[str], output_path: str, tokenizer_path: str | None, dtype: str) -> None:
  import torch
  import transformers

  tokenizer_dir = _tokenizer_dir(model_dir, tokenizer_path)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
  vocab = model.config.vocab_size
  tmp_path = output_path + ".tmp"
  with open(tmp_path, "w", encoding="utf-8") as out:
    for prompt in prompts:
      ids = tokenizer(prompt)["input_ids"]
      if not ids:
        raise SystemExit(f"error: prompt {prompt!r} tokenizes to nothing")
      if max(ids) >= vocab:
        raise SystemExit(f"error: prompt {prompt!r} has token id {max(ids)} >= the model's vocab_size {vocab}")
      with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
      record = {
          "prompt": prompt,
          "tokens": ids,
          "logits": logits.tolist(),
          "model_id": os.path.abspath(model_dir),
          "tokenizer": os.path.abspath(tokenizer_dir),
          "dtype": dtype,
          "transformers_version": transformers.__version__,
          "torch_version": torch.__version__,
      }
      out.write(json.dumps(record) + "\n")
      print(f"{prompt!r}: {len(ids)} tokens, logits {list(logits.shape)}")
  os.replace(tmp_path, output_path)
  print(f"wrote {len(prompts)} prompts to {output_path}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model-id", required=True, help="local HF checkpoint directory")
  parser.add_argument("--output-path", required=True, help="JSON-lines file to write")
  parser.add_argument("--prompts", default="I love to;Today is a;What is the", help="';'-separated prompts")
  parser.add_argument("--tokenizer-path", default=None,
                      help="default: the model directory, else the model family's shipped tokenizer (Qwen3 / Qwen3.6)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = parser.parse_args(argv)
  if not os.path.isdir(args.model_id):
    print(f"error: --model-id '{args.model_id}' is not a local directory (this tool runs offline)", file=sys.stderr)
    return 2
  prompts = [p for p in args.prompts.split(";") if p]
  if not prompts:
    print("error: --prompts is empty", file=sys.stderr)
    return 2
  generate(args.model_id, prompts, args.output_path, args.tokenizer_path, args.dtype)
  return 0


if __name__ == "__main__":
  sys.exit(main())
