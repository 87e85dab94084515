"""YaRN end to end: a random tiny HF Qwen3-Next (and Qwen3.6) with rope_type yarn converts with to_maxtext and
passes the golden-logit checker at 2e-4 on a prompt three times longer than original_max_position_embeddings."""

import json
import os

import numpy as np
import pytest

from maxtext.checkpoint_conversion import to_maxtext
from maxtext.configs.hf_config import config_overrides_from_hf, hf_config_from_config
from maxtext.configs import ConfigError, load_config
from tests.assets.logits_generation import generate_hf_golden_logits
from tests.checkpoint_conversion.test_conversion_e2e import BASE_YML, run_module
from tests.conftest import build_hf_tiny, build_qwen36_tiny, kl_divergence
from tests.utils import forward_pass_logit_checker

ORIGINAL = 32  # original_max_position_embeddings: the prompt below runs to position 99
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
VOCAB = 32000  # holds every id of PROMPT under both the Qwen3 and the Qwen3.6 tokenizer
PROMPT = ("The old man walked to the sea every day. He looked at the water and the boats, and he thought about the years"
          " when he was young and worked on the ships. The wind was cold, but the sun was warm on his face. A small dog"
          " ran along the beach and stopped to look at him. He smiled and gave it some bread from his bag. Then he sat"
          " on a rock and watched the birds fly over the waves until the light was gone and the first stars came out.")
quiet = lambda *_: None


@pytest.fixture(scope="module")
def hf_yarn(tmp_path_factory):
  rope = {"rope_theta": 10000.0, "partial_rotary_factor": 0.25, **YARN}
  return build_hf_tiny("grouped_values", str(tmp_path_factory.mktemp("hf_yarn")), vocab_size=VOCAB,
                       rope_parameters=rope, max_position_embeddings=4 * ORIGINAL)


@pytest.fixture(scope="module")
def golden(hf_yarn, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("golden") / "golden.jsonl")
  generate_hf_golden_logits.generate(hf_yarn.path, [PROMPT], path, None, "float32")
  with open(path, encoding="utf-8") as f:
    assert len(json.loads(f.readline())["tokens"]) > 3 * ORIGINAL
  return path


def _check(items, golden_path, capsys, *overrides):
  code = forward_pass_logit_checker.main([f"load_parameters_path={items}", "dtype=float32", *overrides,
                                          "--max_kl_div=2e-4", f"--golden_logits_path={golden_path}"])
  out = capsys.readouterr().out
  assert code == 0 and out.strip().splitlines()[-1].startswith("PASSED"), out
  row = [line for line in out.splitlines() if line.startswith(PROMPT[:20])][0]
  tokens, max_kl = int(row.split()[-4]), float(row.split()[-3])
  assert tokens > 3 * ORIGINAL and max_kl < 2e-4
  return max_kl


def test_qwen3_next_yarn_converts_and_passes_the_checker(hf_yarn, golden, tmp_path, capsys):
  out = str(tmp_path / "out")
  run_module("maxtext.checkpoint_conversion.to_maxtext", BASE_YML, f"hf_model_path={hf_yarn.path}",
             f"base_output_directory={out}", "scan_layers=true")
  items = os.path.join(out, "0", "items")
  config = load_config([f"load_parameters_path={items}"])
  assert (config.rope_type, config.rope_factor, config.original_max_position_embeddings) == ("yarn", 4.0, ORIGINAL)
  _check(items, golden, capsys, "scan_layers=false")


def test_without_yarn_the_same_weights_exceed_the_bound(hf_yarn, golden):
  """The checker's 2e-4 can tell: the same weights under plain RoPE (what to_maxtext made of YaRN before) miss it."""
  import torch
  from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

  with open(golden, encoding="utf-8") as f:
    record = json.loads(f.readline())
  plain_config = dict(hf_yarn.config_dict, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "partial_rotary_factor": 0.25})
  plain = Qwen3NextForCausalLM(Qwen3NextConfig(**plain_config)).eval()
  plain.load_state_dict(hf_yarn.model.state_dict())
  with torch.no_grad():
    logits = plain(torch.tensor([record["tokens"]])).logits[0].numpy()
  kl = kl_divergence(np.asarray(record["logits"]), logits)
  assert kl.max() > 2e-4


def test_hf_config_round_trip_keeps_transformers_rotary(hf_yarn):
  from transformers import Qwen3NextConfig
  from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRotaryEmbedding

  exported = hf_config_from_config(load_config([f"hf_model_path={hf_yarn.path}"]))
  original, back = (Qwen3NextRotaryEmbedding(c) for c in (hf_yarn.model.config, Qwen3NextConfig(**exported)))
  assert np.array_equal(original.inv_freq.numpy(), back.inv_freq.numpy())
  assert original.attention_scaling == back.attention_scaling


def test_qwen36_yarn_converts_and_passes_the_checker(tmp_path, capsys):
  rope = {"rope_theta": 1e7, "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1], "mrope_interleaved": True,
          **YARN, "beta_fast": 16.0, "mscale": 1.0, "mscale_all_dim": 0.5}
  hf = build_qwen36_tiny("periodic", str(tmp_path / "hf"), vocab_size=VOCAB, rope_parameters=rope,
                         max_position_embeddings=4 * ORIGINAL)
  golden_path = str(tmp_path / "golden.jsonl")
  generate_hf_golden_logits.generate(hf.path, [PROMPT], golden_path, None, "float32")
  config = load_config([f"hf_model_path={hf.path}", "scan_layers=false"])
  assert (config.model_family, config.rope_type, config.mscale_all_dim) == ("qwen3_5_moe", "yarn", 0.5)
  items = to_maxtext.convert(config, hf.path, str(tmp_path / "out" / "0"), log=quiet)
  _check(items, golden_path, capsys, "scan_layers=true")


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "yarn", "original_max_position_embeddings": 32}, "rope_type 'yarn' needs rope_parameters 'factor'"),
    ({"rope_type": "yarn", "factor": 4.0}, "needs rope_parameters 'original_max_position_embeddings'"),
    ({"rope_type": "linear", "factor": 4.0}, "HF config rope_type 'linear' is not supported (only 'default' and"),
])
def test_hf_yarn_without_its_fields_is_one_line(rope, message):
  hf = {k: v for k, v in hf_config_from_config(load_config()).items() if k != "max_position_embeddings"}
  with pytest.raises(ConfigError) as info:
    config_overrides_from_hf({**hf, "rope_parameters": {"rope_theta": 1e6, **rope}})
  assert message in str(info.value) and "\n" not in str(info.value)


def test_legacy_rope_scaling_and_top_level_original_are_read_as_transformers_does():
  hf = {**hf_config_from_config(load_config()), "rope_scaling": {"type": "yarn", "factor": 2.0},
        "original_max_position_embeddings": 4096, "max_position_embeddings": 8192}
  keys = config_overrides_from_hf(hf)
  assert (keys["rope_type"], keys["rope_factor"], keys["original_max_position_embeddings"]) == ("yarn", 2.0, 4096)
