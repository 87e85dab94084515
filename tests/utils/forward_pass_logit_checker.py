"""Run our model on the golden prompts and compare its logits with HF's.

  python3 -m tests.utils.forward_pass_logit_checker src/maxtext/configs/base.yml tokenizer_type=huggingface \
      tokenizer_path=TOK load_parameters_path=OUT/0/items scan_layers=false dtype=float32 \
      --max_kl_div=2e-4 --golden_logits_path=golden.jsonl

Prints per prompt the max KL(HF || ours), max |logit diff| and top-1 agreement; exits 1 when a bound is exceeded.
The model comes from the checkpoint's stored config unless model_name is given (then it must match).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

_FLAGS = {"--max_kl_div": float, "--golden_logits_path": str, "--max_abs_diff": float, "--min_top1_agreement": float}


def split_flags(argv: Sequence[str]) -> tuple[dict, list[str]]:
  """`--flag=value` arguments (ours) apart from the config's `key=value` ones."""
  flags, rest = {}, []
  for arg in argv:
    if arg.startswith("--"):
      name, _, value = arg.partition("=")
      if name not in _FLAGS:
        raise SystemExit(f"error: unknown flag '{name}' (known: {', '.join(_FLAGS)})")
      try:
        flags[name[2:]] = _FLAGS[name](value)
      except ValueError:
        raise SystemExit(f"error: flag '{name}' expects a {_FLAGS[name].__name__}, got {value!r}") from None
    else:
      rest.append(arg)
  return flags, rest


def read_golden(path: str) -> list[dict]:
  if not os.path.isfile(path):
    raise SystemExit(f"error: golden logits file '{path}' does not exist")
  records = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      try:
        record = json.loads(line)
        records.append({"prompt": record["prompt"], "tokens": record["tokens"], "logits": np.asarray(record["logits"])})
      except (json.JSONDecodeError, KeyError) as e:
        raise SystemExit(f"error: '{path}' line {number} is not a golden record ({type(e).__name__}: {e})") from None
  if not records:
    raise SystemExit(f"error: '{path}' holds no records")
  return records


def compare(golden: np.ndarray, ours: np.ndarray) -> dict[str, float]:
  """Max per-token KL(golden || ours) in float64, max |diff|, fraction of tokens with the same argmax."""

  def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  log_p, log_q = log_softmax(golden), log_softmax(ours)
  kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
  return {
      "max_kl": float(kl.max()),
      "max_abs_diff": float(np.abs(golden.astype(np.float64) - ours).max()),
      "top1": float((golden.argmax(-1) == ours.argmax(-1)).mean()),
  }


def _tokenizer(tokenizer_path: str, model_family: str):
  """The tokenizer named by the config (the family's shipped one by default), to confirm the golden token ids."""
  from transformers import AutoTokenizer

  from maxtext.assets.tokenizers import ensure_family_tokenizer

  return AutoTokenizer.from_pretrained(tokenizer_path or ensure_family_tokenizer(model_family))


def main(argv: Sequence[str]) -> int:
  import jax
  import jax.numpy as jnp

  from maxtext.checkpoint_conversion import orbax_io
  from maxtext.configs import ConfigError, load_config
  from maxtext.models.qwen3_next import Qwen3NextForCausalLM
  from maxtext.models.spec import ModelSpec

  flags, config_argv = split_flags(argv)
  if "golden_logits_path" not in flags:
    raise SystemExit("error: --golden_logits_path is required")
  config = load_config(config_argv)
  if not config.load_parameters_path:
    raise ConfigError("config key 'load_parameters_path' must name the checkpoint to check")
  spec = ModelSpec.from_config(config)
  params = orbax_io.load_params(config.load_parameters_path, spec)
  model = Qwen3NextForCausalLM(spec)
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t, with_mtp=False).logits.astype(jnp.float32))
  tokenizer = _tokenizer(config.tokenizer_path, config.model_family)
  max_kl, max_abs, min_top1 = flags.get("max_kl_div"), flags.get("max_abs_diff"), flags.get("min_top1_agreement")
  failed = False
  print(f"{'prompt':<32} {'tokens':>6} {'max KL':>10} {'max |diff|':>11} {'top-1':>6}")
  for record in read_golden(flags["golden_logits_path"]):
    tokens = np.asarray(record["tokens"], np.int32)[None]
    if tokenizer(record["prompt"])["input_ids"] != record["tokens"]:
      print(f"note: the tokenizer at '{config.tokenizer_path or 'the shipped tokenizer asset'}' tokenises"
            f" {record['prompt']!r} differently from the golden file; using the golden ids")
    if tokens.max() >= config.vocab_size:
      raise SystemExit(f"error: golden token id {tokens.max()} >= the model's vocab_size {config.vocab_size}")
    ours = np.asarray(forward(params, tokens))[0]
    if ours.shape != record["logits"].shape:
      raise SystemExit(f"error: golden logits have shape {record['logits'].shape}, ours {ours.shape}")
    stats = compare(record["logits"], ours)
    bad = (max_kl is not None and stats["max_kl"] > max_kl) or (
        max_abs is not None and stats["max_abs_diff"] > max_abs) or (
        min_top1 is not None and stats["top1"] < min_top1)
    failed |= bad
    print(f"{record['prompt'][:32]:<32} {tokens.shape[1]:>6} {stats['max_kl']:>10.3e} {stats['max_abs_diff']:>11.3e}"
          f" {stats['top1']:>6.2f}{'  FAIL' if bad else ''}")
  bounds = ", ".join(f"{k}={v}" for k, v in flags.items() if k != "golden_logits_path") or "none"
  print(f"{'FAILED' if failed else 'PASSED'} (bounds: {bounds})")
  return 1 if failed else 0


if __name__ == "__main__":
  from maxtext.utils import cli

  cli.run(main)
