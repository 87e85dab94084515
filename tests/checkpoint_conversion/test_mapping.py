"""The HF name table and the scan layout: exact round trips and clear errors."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from maxtext.configs.hf_config import config_overrides_from_hf, hf_config_from_config
from maxtext.checkpoint_conversion.hf_state import params_from_hf_state
from maxtext.checkpoint_conversion.param_mapping import parameter_mappings, to_hf
from maxtext.checkpoint_conversion.scan_layout import scan_layers, unscan_layers
from maxtext.configs import ConfigError, load_config
from maxtext.models import params as model_params
from maxtext.models.spec import ModelSpec
from tests.conftest import our_config


def test_table_covers_every_parameter_exactly_once():
  spec = ModelSpec.from_config(load_config(["scan_layers=false", "logits_via_embedding=false"]))
  ours = [m.ours for m in parameter_mappings(spec)]
  assert sorted(ours) == sorted(model_params.flat_shapes(spec))
  hf_names = [n for m in parameter_mappings(spec) for n in m.hf]
  assert len(hf_names) == len(set(hf_names))


def test_hf_to_ours_to_hf_is_exact(hf_tiny):
  spec = ModelSpec.from_config(our_config(hf_tiny.config_dict, scan_layers=False))
  flat = model_params.flatten(params_from_hf_state(spec, hf_tiny.tensors))
  back = {}
  for mapping in parameter_mappings(spec):
    back.update(to_hf(mapping, np.asarray(flat[mapping.ours])))
  assert set(back) == set(hf_tiny.tensors)
  for name, tensor in hf_tiny.tensors.items():
    np.testing.assert_array_equal(back[name], tensor, err_msg=name)


def test_scan_then_unscan_is_identity():
  spec = ModelSpec.from_config(load_config(["scan_layers=false"]))
  params = nn.unbox(model_params.init_variables(spec, jax.random.key(0)))["params"]
  scanned = scan_layers(params, spec.num_layers, spec.block_length)
  scanned_shapes = model_params.flat_shapes(ModelSpec.from_config(load_config(["scan_layers=true"])))
  assert {k: v.shape for k, v in model_params.flatten(scanned).items()} == scanned_shapes
  restored = unscan_layers(scanned, spec.num_layers, spec.block_length)
  jax.tree.map(np.testing.assert_array_equal, restored, params)


def test_hf_config_round_trip():
  config = load_config(["model_name=qwen3-next-80b-a3b"])
  overrides = config_overrides_from_hf(hf_config_from_config(config))
  assert load_config(["model_name=qwen3-next-80b-a3b"], overrides=overrides) == config


def test_missing_and_misshaped_tensors_are_named(hf_tiny):
  spec = ModelSpec.from_config(our_config(hf_tiny.config_dict))
  tensors = dict(hf_tiny.tensors)
  del tensors["model.layers.0.linear_attn.A_log"]
  with pytest.raises(KeyError, match="missing tensor 'model.layers.0.linear_attn.A_log'"):
    params_from_hf_state(spec, tensors)
  tensors = {**hf_tiny.tensors, "model.norm.weight": np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match=r"tensor 'model.norm.weight' has shape \(3,\)"):
    params_from_hf_state(spec, tensors)
  with pytest.raises(ValueError, match="unexpected tensor 'model.extra'"):
    params_from_hf_state(spec, {**hf_tiny.tensors, "model.extra": np.zeros(1)})


def test_unsupported_hf_configs_are_rejected():
  good = hf_config_from_config(load_config())
  with pytest.raises(ConfigError, match="rope_type 'dynamic' is not supported"):
    config_overrides_from_hf({**good, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e6}})
  with pytest.raises(ConfigError, match="dense MLP layers"):
    config_overrides_from_hf({**good, "mlp_only_layers": [0]})
