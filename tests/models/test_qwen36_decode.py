"""Qwen3.6 decoding: `maxtext.decode` on a converted checkpoint continues a prompt exactly as HF `generate` does
(greedy, float32, the shipped Qwen3.6 tokenizer), and MTP speculative decoding returns the same greedy tokens."""

import os
import subprocess
import sys

import jax
import pytest

from maxtext.checkpoint_conversion import to_maxtext
from maxtext.configs import load_config
from maxtext.inference.engine import Engine
from maxtext.inference.sampling import SamplingParams
from tests.assets.tiny_qwen36_checkpoint import fuse_experts, random_mtp_tensors, write_folder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "I love to"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def with_mtp(qwen36_periodic, tmp_path_factory):
  """The periodic tiny Qwen3.6 plus an MTP layer, stored as the hub does (fused experts), converted to orbax."""
  hf_dir = str(tmp_path_factory.mktemp("hf_mtp"))
  tensors = {**qwen36_periodic.tensors, **random_mtp_tensors(qwen36_periodic.tensors)}
  write_folder(qwen36_periodic.path, hf_dir, fuse_experts(tensors), {"mtp_num_hidden_layers": 1})
  out = str(tmp_path_factory.mktemp("orbax_mtp"))
  items = to_maxtext.convert(load_config([f"hf_model_path={hf_dir}"]), hf_dir, os.path.join(out, "0"),
                             log=lambda *_: None)
  return hf_dir, items


@pytest.fixture(scope="module")
def hf_greedy(with_mtp) -> tuple[list[int], list[int], str]:
  """(prompt ids, HF generate's new ids, their text) with the shipped Qwen3.6 tokenizer."""
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  from maxtext.assets.tokenizers import ensure_qwen36_tokenizer

  tokenizer = AutoTokenizer.from_pretrained(ensure_qwen36_tokenizer())
  prompt_ids = tokenizer(PROMPT)["input_ids"]
  model = AutoModelForCausalLM.from_pretrained(with_mtp[0], dtype=torch.float32).eval()
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=0)
  new = out[0, len(prompt_ids):].tolist()
  return prompt_ids, new, tokenizer.decode(new, skip_special_tokens=True)


def test_decode_cli_matches_hf_generate(with_mtp, hf_greedy):
  items, expected_text = with_mtp[1], hf_greedy[2]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  result = subprocess.run(
      [sys.executable, "-m", "maxtext.decode", f"load_parameters_path={items}", f"prompt={PROMPT}", "dtype=float32",
       f"decode_max_new_tokens={NEW_TOKENS}", "decode_stop_token_ids=none", "max_prefill_predict_length=16",
       "max_target_length=64", "scan_layers=true"],
      cwd=REPO, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  prefix = f"Input `{PROMPT}` -> `"
  assert result.stdout.startswith(prefix), result.stdout
  assert result.stdout[len(prefix):].rstrip("\n").removesuffix("`") == expected_text
  assert f"{NEW_TOKENS} tokens in" in result.stderr


def test_mtp_speculation_gives_the_greedy_token_ids(with_mtp, hf_greedy):
  """Token ids: the speculative engine (2 drafts a round from the converted MTP head) emits
  HF's greedy ids, which the command above reproduces with plain decoding."""
  items, (prompt_ids, expected, _) = with_mtp[1], hf_greedy
  config = load_config([f"load_parameters_path={items}", "dtype=float32", "max_target_length=64",
                        "max_prefill_predict_length=16", "scan_layers=true", "mtp_speculative_decoding=true",
                        "mtp_num_draft_tokens=2"])
  speculative = Engine(config, devices=jax.devices()[:1])
  assert [e.token_id for e in speculative.generate([prompt_ids], [SamplingParams(max_tokens=NEW_TOKENS)])] == expected
  assert speculative.last_stats["drafted"] > 0
