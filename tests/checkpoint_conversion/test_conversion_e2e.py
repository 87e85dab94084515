"""HF safetensors -> orbax -> our model, checked against HF golden logits; and orbax -> HF -> transformers.

The documented commands run as subprocesses, exactly as a user types them (local paths).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from maxtext.checkpoint_conversion import orbax_io, to_huggingface, to_maxtext
from maxtext.configs import load_config
from tests.conftest import build_hf_tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE_YML = os.path.join(REPO, "src", "maxtext", "configs", "base.yml")
QWEN_VOCAB = 151936  # the golden prompts go through the real Qwen tokenizer


def run_module(*args, check=True):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True)
  if check and result.returncode != 0:
    raise AssertionError(f"{args[0]} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
  return result


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  return build_hf_tiny("grouped_values", str(tmp_path_factory.mktemp("hf")), vocab_size=QWEN_VOCAB)


@pytest.fixture(scope="module")
def golden(hf_model, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("golden") / "golden.jsonl")
  run_module(
      "tests.assets.logits_generation.generate_hf_golden_logits", f"--model-id={hf_model.path}",
      f"--output-path={path}", "--prompts=I love to;Today is a;What is the",
  )
  return path


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory):
  """{scan_layers: items path}; the scanned one through the documented command line."""
  out = {}
  scanned_dir = str(tmp_path_factory.mktemp("scanned"))
  run_module(
      "maxtext.checkpoint_conversion.to_maxtext", BASE_YML, "model_name=auto", f"base_output_directory={scanned_dir}",
      f"hf_model_path={hf_model.path}", "scan_layers=true", "use_multimodal=false", "hf_access_token=unused",
  )
  out[True] = os.path.join(scanned_dir, "0", "items")
  unscanned_dir = str(tmp_path_factory.mktemp("unscanned"))
  config = load_config([f"hf_model_path={hf_model.path}", "scan_layers=false"])
  out[False] = to_maxtext.convert(config, hf_model.path, os.path.join(unscanned_dir, "0"), log=lambda *_: None)
  return out


def test_golden_file_records_what_reruns_it(golden, hf_model):
  with open(golden, encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert [r["prompt"] for r in records] == ["I love to", "Today is a", "What is the"]
  for record in records:
    assert np.asarray(record["logits"]).shape == (len(record["tokens"]), QWEN_VOCAB)
    assert record["model_id"] == os.path.abspath(hf_model.path)
    assert {"tokenizer", "dtype", "transformers_version", "torch_version"} <= set(record)


@pytest.mark.parametrize("stored_scanned", [True, False], ids=["scanned_ckpt", "unscanned_ckpt"])
def test_checker_passes_on_converted_checkpoint(converted, golden, stored_scanned):
  # The model comes from the checkpoint (no model_name); it runs in the other layout than it was stored in.
  result = run_module(
      "tests.utils.forward_pass_logit_checker", BASE_YML, "tokenizer_type=huggingface",
      f"load_parameters_path={converted[stored_scanned]}", f"scan_layers={str(not stored_scanned).lower()}",
      "dtype=float32", "--max_kl_div=2e-4", f"--golden_logits_path={golden}",
  )
  lines = result.stdout.strip().splitlines()
  assert lines[-1].startswith("PASSED")
  rows = [line for line in lines if line.startswith(("I love to", "Today is a", "What is the"))]
  assert len(rows) == 3
  for row in rows:
    max_kl, max_diff, top1 = map(float, row.split()[-3:])
    assert max_kl < 2e-4 and top1 == 1.0


def test_checker_fails_when_the_bound_is_exceeded(converted, golden):
  result = run_module(
      "tests.utils.forward_pass_logit_checker", BASE_YML, f"load_parameters_path={converted[True]}",
      "dtype=float32", "--max_kl_div=0", f"--golden_logits_path={golden}", check=False,
  )
  assert result.returncode == 1
  assert "FAIL" in result.stdout


def test_stored_model_config_drives_the_config(converted, hf_model):
  config = load_config([f"load_parameters_path={converted[True]}"])
  assert config.model_name == "auto"
  assert (config.vocab_size, config.base_emb_dim, config.linear_num_value_heads) == (QWEN_VOCAB, 64, 4)
  assert config.mtp_num_layers == 0  # transformers' save_pretrained writes no mtp.* tensors


def test_round_trip_is_bitwise(converted, hf_model, tmp_path):
  """orbax -> HF -> orbax gives the same arrays, and the HF tensors equal the original file's."""
  from safetensors.numpy import load_file

  exported = str(tmp_path / "hf")
  to_huggingface.export(load_config([f"load_parameters_path={converted[True]}"]), converted[True], exported,
                        log=lambda *_: None)
  original, back = load_file(os.path.join(hf_model.path, "model.safetensors")), load_file(
      os.path.join(exported, "model.safetensors"))
  assert sorted(original) == sorted(back)
  for name in original:
    assert original[name].dtype == back[name].dtype and np.array_equal(original[name], back[name]), name
  reconverted = to_maxtext.convert(load_config([f"hf_model_path={exported}"]), exported, str(tmp_path / "again" / "0"),
                                   log=lambda *_: None)
  first, second = orbax_io.restore_flat(converted[True]), orbax_io.restore_flat(reconverted)
  assert sorted(first) == sorted(second)
  for path in first:
    assert first[path].dtype == second[path].dtype and np.array_equal(first[path], second[path]), path


def test_exported_checkpoint_gives_identical_logits_in_transformers(converted, hf_model, tmp_path):
  import torch
  from transformers import AutoModelForCausalLM

  exported = str(tmp_path / "hf")
  run_module(
      "maxtext.checkpoint_conversion.to_huggingface", BASE_YML, f"load_parameters_path={converted[False]}",
      f"base_output_directory={exported}",
  )
  load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  original, reloaded = load(hf_model.path), load(exported)
  tokens = torch.randint(0, QWEN_VOCAB, (2, 37), generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    assert torch.equal(reloaded(tokens).logits, original(tokens).logits)
