"""The config system: merge order, types, validation, and one-line errors at the command line."""

import os
import subprocess
import sys

import pytest

from maxtext.configs import Config, ConfigError, load_config
from maxtext.configs.loader import CONFIGS_DIR, _read_yaml, available_models

BASE = os.path.join(CONFIGS_DIR, "base.yml")


def test_base_yml_defines_every_key_and_nothing_else():
  assert set(_read_yaml(BASE)) == set(Config.field_types())


def test_model_file_overrides_base_and_cli_overrides_model():
  config = load_config([BASE, "model_name=qwen3-next-80b-a3b"])
  assert (config.base_emb_dim, config.num_experts, config.num_experts_per_tok) == (2048, 512, 10)
  assert config.layer_types[:4] == ("linear_attention",) * 3 + ("full_attention",)
  assert config.num_blocks == 12 and config.rotary_dim == 64
  config = load_config([BASE, "model_name=qwen3-next-80b-a3b", "num_experts=64", "scan_layers=false"])
  assert config.num_experts == 64 and config.scan_layers is False


def test_values_are_coerced_to_the_declared_types():
  config = load_config(["normalization_layer_epsilon=1e-5", "per_device_batch_size=2", "norm_topk_prob=False"])
  assert config.normalization_layer_epsilon == 1e-5 and config.per_device_batch_size == 2.0
  assert config.norm_topk_prob is False


def test_config_is_frozen():
  config = load_config()
  with pytest.raises(Exception):
    config.num_experts = 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("scan_layer=true", "unknown config key 'scan_layer' in the command line (did you mean 'scan_layers'?)"),
        ("num_experts=many", "config key 'num_experts' expects an integer, got 'many'"),
        ("scan_layers=maybe", "config key 'scan_layers' expects a bool (true/false), got 'maybe'"),
        ("dtype=fp8", "config key 'dtype' must be one of float32, bfloat16, float16; got 'fp8'"),
        ("base_num_query_heads=5", "config key 'base_num_query_heads' (5) must be a multiple of 'base_num_kv_heads' (2)"),
        ("linear_num_value_heads=5", "config key 'linear_num_value_heads' (5) must be a multiple of 'linear_num_key_heads' (2)"),
        ("num_experts_per_tok=9", "config key 'num_experts_per_tok' (9) must not exceed 'num_experts' (8)"),
        ("ici_tensor_parallelism=3", "config key 'base_num_query_heads' (4) must be divisible by 'ici_tensor_parallelism' (3)"),
        ("partial_rotary_factor=0.3", "config key 'partial_rotary_factor' (0.3) times head_dim (32) must be an even"),
        ("model_name=qwen3-huge", "unknown model_name 'qwen3-huge'"),
    ],
)
def test_bad_input_is_rejected_naming_the_key(override, message):
  with pytest.raises(ConfigError) as error:
    load_config([BASE, override])
  assert message in str(error.value)


def test_scanning_needs_whole_blocks():
  with pytest.raises(ConfigError, match="'base_num_decoder_layers' \\(6\\) must be a multiple of 'full_attention_interval'"):
    load_config(["base_num_decoder_layers=6"])
  assert load_config(["base_num_decoder_layers=6", "scan_layers=false"]).num_blocks == 1


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
  path = tmp_path / "mine.yml"
  path.write_text(open(BASE).read() + "\nlearning_rte: 0.1\n")
  with pytest.raises(ConfigError, match=f"unknown config key 'learning_rte' in '{path}'"):
    load_config([str(path)])


def test_every_shipped_model_file_loads():
  for name in available_models():
    assert load_config([f"model_name={name}"]).model_name == name


@pytest.mark.parametrize(
    "args",
    [["scan_layer=true"], ["num_experts=abc"], ["base_num_query_heads=3"], ["src/maxtext/configs/nope.yml"]],
)
def test_command_line_errors_are_one_line(args):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run(
      [sys.executable, "-m", "maxtext.forward_pass", *(args if args[0].endswith(".yml") else [BASE, *args])],
      capture_output=True, text=True, cwd=root, timeout=120,
  )
  assert result.returncode == 2
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
