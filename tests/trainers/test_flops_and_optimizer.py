"""The FLOPs formula against the model's real parameter shapes; the learning-rate schedule and weight-decay mask."""

import math

import jax.numpy as jnp
import numpy as np

from maxtext.configs import load_config
from maxtext.models import params as model_params
from maxtext.models.spec import ModelSpec
from maxtext.trainers import flops
from maxtext.trainers.optimizer import learning_rate_schedule, weight_decay_mask


def active_matmul_parameters(config) -> float:
  """Matmul weights one token uses, counted from the parameter tree: everything but the embedding table, norms,
  conv, A_log and dt_bias; of the routed experts only top_k of num_experts."""
  shapes = model_params.flat_shapes(ModelSpec.from_config(config))
  total = 0.0
  for path, shape in shapes.items():
    name = path.split("/")[-1]
    if "token_embedder" in path or name in ("scale", "A_log", "dt_bias") or "conv1d" in path:
      continue
    size = math.prod(shape)
    if "/experts/" in path:
      size *= config.num_experts_per_tok / config.num_experts
    total += size
  return total


def test_forward_flops_are_twice_the_active_weights_plus_the_sequence_terms():
  config = load_config(overrides={"scan_layers": False, "mtp_num_layers": 0})
  c = config
  attention_layers = c.layer_types.count("full_attention")
  gdn_layers = c.layer_types.count("linear_attention")
  sequence_terms = attention_layers * 2 * c.max_target_length * c.base_num_query_heads * c.head_dim
  dk, dv, chunk = c.linear_key_head_dim, c.linear_value_head_dim, c.gdn_chunk_size
  sequence_terms += gdn_layers * c.linear_num_value_heads * (6 * dk * dv + chunk * (3 * dk + 2 * dv))
  conv_channels = 2 * c.linear_num_key_heads * dk + c.linear_num_value_heads * dv
  sequence_terms += gdn_layers * 2 * c.linear_conv_kernel_dim * conv_channels
  expected = 2 * active_matmul_parameters(config) + sequence_terms
  assert flops.forward_flops_per_token(config) == expected
  assert flops.training_flops_per_token(config) == 3 * expected


def test_mtp_adds_its_layer_when_trained():
  with_mtp = load_config(overrides={"mtp_num_layers": 1, "mtp_loss_scaling_factor": 0.1})
  skipped = load_config(overrides={"mtp_num_layers": 1, "mtp_loss_scaling_factor": 0.0})
  assert flops.forward_flops_per_token(with_mtp) > flops.forward_flops_per_token(skipped)


def test_peak_of_known_devices_and_none_for_a_cpu():
  assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert flops.peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert flops.peak_tflops("cpu") is None
  # jax's device_kind strings for TPUs: v5p is plain "TPU v5", v5e "TPU v5 lite", v6e "TPU v6 lite".
  assert flops.peak_tflops("TPU v5") == 459.0
  assert flops.peak_tflops("TPU v5 lite") == 197.0
  assert flops.peak_tflops("TPU v6 lite") == 918.0


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_final_fraction():
  config = load_config(overrides={"learning_rate": 1.0, "steps": 100, "warmup_steps_fraction": 0.1,
                                  "cosine_learning_rate_final_fraction": 0.1})
  lr = learning_rate_schedule(config)
  values = np.array([float(lr(step)) for step in range(0, 120)])
  np.testing.assert_allclose(values[:11], np.arange(11) / 10, atol=1e-6)
  decay = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (np.arange(10, 101) - 10) / 90))
  np.testing.assert_allclose(values[10:101], decay, atol=1e-6)
  np.testing.assert_allclose(values[100:], 0.1, atol=1e-6)


def test_weight_decay_skips_norm_scales_and_gate_parameters():
  spec = ModelSpec.from_config(load_config(overrides={"scan_layers": True}))
  params = model_params.unflatten({p: jnp.zeros(s) for p, s in model_params.flat_shapes(spec).items()})
  mask = model_params.flatten(weight_decay_mask(params))
  decayed = {p for p, m in mask.items() if m}
  assert "decoder/blocks/layer_0/linear_attn/in_proj_qkvz/kernel" in decayed
  assert "decoder/blocks/layer_0/mlp/experts/gate_proj" in decayed
  assert "token_embedder/embedding" in decayed
  for path in ("norm/scale", "decoder/blocks/layer_0/linear_attn/A_log", "decoder/blocks/layer_0/linear_attn/dt_bias",
               "decoder/blocks/layer_3/self_attn/q_norm/scale"):
    assert path not in decayed
