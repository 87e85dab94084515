"""Per-layer patterns (HF layer_types): the scanned block, the config keys and the HF config translation."""

import pytest

from maxtext.configs.hf_config import config_overrides_from_hf, hf_config_from_config
from maxtext.configs import ConfigError, load_config
from maxtext.configs.layer_pattern import block_length, periodic_interval

L, F = "linear_attention", "full_attention"


@pytest.mark.parametrize("pattern, length", [
    ([L, L, L, F] * 10, 4), ([L, F] * 3, 2), ([L, F, L, L, F], 5), ([L] * 6, 1), ([L, F, L, F, L, L], 6),
    ([L, L, F, L, L, F, L, L, F, L, L, F], 3), ([F], 1),
])
def test_block_length_is_the_shortest_repeat(pattern, length):
  assert block_length(pattern) == length


def test_periodic_interval_only_for_every_kth_layer():
  assert periodic_interval([L, L, L, F] * 2) == 4
  assert periodic_interval([L, F, L, L, F]) is None
  assert periodic_interval([L, L, F, L]) == 3  # the rule with a partial last block
  assert periodic_interval([L] * 4) is None


def test_hf_layer_types_become_an_interval_only_for_whole_blocks():
  base = config_overrides_from_hf(hf_config_from_config(load_config(["model_name=qwen3.6-35b-a3b"])))
  text = lambda types: {"model_type": "qwen3_5_moe_text", **hf_config_from_config(
      load_config(["model_name=qwen3.6-35b-a3b"]))["text_config"], "num_hidden_layers": len(types), "layer_types": types}
  assert (base["full_attention_interval"], base["decoder_layer_types"]) == (4, "")
  partial = config_overrides_from_hf(text([L, L, F, L]))
  assert partial["decoder_layer_types"] == ",".join([L, L, F, L])
  assert config_overrides_from_hf(text([L, F] * 3))["decoder_layer_types"] == ""
  assert config_overrides_from_hf(text([L, F] * 3))["full_attention_interval"] == 2


def test_explicit_pattern_drives_layer_types_and_the_scan():
  pattern = ",".join([L, F, L, L, F])
  config = load_config([f"decoder_layer_types={pattern}", "base_num_decoder_layers=5"])
  assert config.layer_types == (L, F, L, L, F) and config.num_blocks == 1
  config = load_config([f"decoder_layer_types={','.join([L, F] * 3)}", "base_num_decoder_layers=6"])
  assert config.num_blocks == 3


@pytest.mark.parametrize("overrides, message", [
    (["decoder_layer_types=linear_attention,full", "base_num_decoder_layers=2"],
     "config key 'decoder_layer_types': entry 1 is 'full', expected one of linear_attention, full_attention"),
    ([f"decoder_layer_types={L},{F}", "base_num_decoder_layers=3"],
     "config key 'decoder_layer_types' lists 2 layers but 'base_num_decoder_layers' is 3"),
    (["model_family=qwen3_5_moe", "norm_topk_prob=false"],
     "config key 'norm_topk_prob' must be true for model_family=qwen3_5_moe"),
], ids=["unknown-entry", "wrong-length", "family-needs-renormalised-topk"])
def test_bad_pattern_is_one_line(overrides, message):
  with pytest.raises(ConfigError, match="^" + message.replace("(", "\\(").replace(")", "\\)")):
    load_config(overrides)


@pytest.mark.parametrize("model_name, extra", [
    ("qwen3.6-35b-a3b", []),
    ("qwen3-next-80b-a3b", []),
    ("qwen3.6-35b-a3b", [f"decoder_layer_types={','.join([L, L, F, L] * 10)}"]),
], ids=["qwen3.6", "qwen3-next", "qwen3.6-non-periodic"])
def test_hf_config_round_trip(model_name, extra):
  """Our config -> HF config.json -> our model keys gives back the same model."""
  config = load_config([f"model_name={model_name}", *extra])
  hf = hf_config_from_config(config)
  back = config_overrides_from_hf(hf)
  for key, value in back.items():
    assert getattr(config, key) == value, key
  if config.model_family == "qwen3_5_moe":
    assert hf["model_type"] == "qwen3_5_moe" and hf["text_config"]["layer_types"] == list(config.layer_types)
    assert sum(hf["text_config"]["rope_parameters"]["mrope_section"]) == config.rotary_dim // 2
