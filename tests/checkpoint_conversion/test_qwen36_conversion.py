"""Qwen3.6 (HF qwen3_5_moe) end to end: HF folder -> orbax (no model_name; scanned and unscanned; experts per
expert or fused 3-D, MTP included) -> golden-logit checker; orbax -> HF -> transformers; MTP tensors both ways."""

import os

import numpy as np
import pytest

from maxtext.checkpoint_conversion import orbax_io, to_huggingface, to_maxtext
from maxtext.configs import load_config
from tests.assets.tiny_qwen36_checkpoint import fuse_experts, random_mtp_tensors, read_tensors, write_folder
from tests.checkpoint_conversion.test_conversion_e2e import BASE_YML, run_module
from tests.utils import forward_pass_logit_checker

PROMPTS = "I love to;Today is a;What is the"
quiet = lambda *_: None


@pytest.fixture(scope="module")
def fused_irregular(qwen36_irregular, tmp_path_factory):
  """The non-periodic checkpoint rewritten with fused 3-D experts, as the hub's Qwen3.6 repos store them."""
  path = str(tmp_path_factory.mktemp("fused"))
  write_folder(qwen36_irregular.path, path, fuse_experts(qwen36_irregular.tensors))
  return path


@pytest.fixture(scope="module")
def golden(qwen36_irregular, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("golden") / "golden.jsonl")
  run_module("tests.assets.logits_generation.generate_hf_golden_logits", f"--model-id={qwen36_irregular.path}",
             f"--output-path={path}", f"--prompts={PROMPTS}")
  return path


@pytest.fixture(scope="module")
def scanned_from_fused(fused_irregular, tmp_path_factory):
  """Through the documented command line: no model_name, the model comes from config.json."""
  out = str(tmp_path_factory.mktemp("scanned"))
  run_module("maxtext.checkpoint_conversion.to_maxtext", BASE_YML, f"hf_model_path={fused_irregular}",
             f"base_output_directory={out}", "scan_layers=true")
  return os.path.join(out, "0", "items")


def _convert(hf_path, out_dir, *overrides):
  config = load_config([f"hf_model_path={hf_path}", *overrides])
  return to_maxtext.convert(config, hf_path, os.path.join(out_dir, "0"), log=quiet)


def test_checker_passes_on_the_converted_non_periodic_checkpoint(scanned_from_fused, golden):
  record = orbax_io.read_model_config(scanned_from_fused)["model"]
  assert record["model_family"] == "qwen3_5_moe"
  assert record["decoder_layer_types"].split(",")[:2] == ["linear_attention", "full_attention"]
  # Stored scanned, run unscanned; the tokenizer is the family's (Qwen3.6), the HF folder has none.
  result = run_module("tests.utils.forward_pass_logit_checker", BASE_YML, f"load_parameters_path={scanned_from_fused}",
                      "scan_layers=false", "dtype=float32", "--max_kl_div=2e-4", f"--golden_logits_path={golden}")
  lines = result.stdout.strip().splitlines()
  assert lines[-1].startswith("PASSED") and "differently" not in result.stdout
  rows = [line for line in lines if line.startswith(tuple(PROMPTS.split(";")))]
  assert len(rows) == 3 and all(float(row.split()[-3]) < 2e-4 for row in rows)


def test_periodic_checkpoint_passes_the_checker(qwen36_periodic, tmp_path, capsys):
  """Stored unscanned, run scanned (blocks of 4 layers); the same tools, called in-process."""
  from tests.assets.logits_generation import generate_hf_golden_logits

  golden_path = str(tmp_path / "golden.jsonl")
  generate_hf_golden_logits.generate(qwen36_periodic.path, PROMPTS.split(";"), golden_path, None, "float32")
  items = _convert(qwen36_periodic.path, str(tmp_path / "unscanned"), "scan_layers=false")
  code = forward_pass_logit_checker.main([f"load_parameters_path={items}", "scan_layers=true", "dtype=float32",
                                          "--max_kl_div=2e-4", f"--golden_logits_path={golden_path}"])
  out = capsys.readouterr().out
  assert code == 0 and out.strip().splitlines()[-1].startswith("PASSED"), out


def test_fused_and_per_expert_checkpoints_convert_to_the_same_arrays(scanned_from_fused, qwen36_irregular, tmp_path):
  per_expert = orbax_io.restore_flat(_convert(qwen36_irregular.path, str(tmp_path / "per_expert")))
  fused = orbax_io.restore_flat(scanned_from_fused)
  assert sorted(per_expert) == sorted(fused)
  for path, value in per_expert.items():
    assert value.dtype == fused[path].dtype and np.array_equal(value, fused[path]), path


def test_round_trip_through_transformers(scanned_from_fused, qwen36_irregular, tmp_path):
  """orbax -> HF folder: tensors equal the original save_pretrained's bit for bit, transformers' text-only and
  multimodal classes load it, and their logits equal the original model's."""
  import torch
  from transformers import AutoModelForCausalLM, Qwen3_5MoeForConditionalGeneration

  exported = str(tmp_path / "hf")
  to_huggingface.export(load_config([f"load_parameters_path={scanned_from_fused}"]), scanned_from_fused, exported,
                        log=quiet)
  original = {k: v for k, v in qwen36_irregular.tensors.items() if not k.startswith("model.visual.")}
  back = read_tensors(exported)
  assert sorted(back) == sorted(original)
  for name, value in original.items():
    assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
  tokens = torch.randint(0, 16000, (2, 37), generator=torch.Generator().manual_seed(0))
  for model_class in (AutoModelForCausalLM, Qwen3_5MoeForConditionalGeneration):
    load = lambda path: model_class.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
      assert torch.equal(load(exported)(input_ids=tokens).logits, load(qwen36_irregular.path)(input_ids=tokens).logits)


@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
def test_mtp_tensors_convert_both_ways_bit_exactly(qwen36_irregular, tmp_path, fused):
  mtp = random_mtp_tensors(qwen36_irregular.tensors)
  tensors = {**qwen36_irregular.tensors, **mtp}
  source = str(tmp_path / "hf")
  write_folder(qwen36_irregular.path, source, fuse_experts(tensors) if fused else tensors, {"mtp_num_hidden_layers": 1})
  items = _convert(source, str(tmp_path / "orbax"), "scan_layers=false")
  config = load_config([f"load_parameters_path={items}"])
  assert config.mtp_num_layers == 1
  stored = orbax_io.restore_flat(items)
  assert any(path.startswith("mtp/layers_0/mlp/experts/") for path in stored)
  exported = str(tmp_path / "back")
  to_huggingface.export(config, items, exported, log=quiet)
  back = read_tensors(exported)
  for name, value in mtp.items():  # per-expert in, per-expert out; fused in, split back per expert
    assert np.array_equal(back[name], value), name
