"""dtype (compute) and weight_dtype (storage) from the config reach parameters and activations."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from maxtext.configs import load_config
from maxtext.models import params as model_params
from maxtext.models.qwen3_next import Qwen3NextForCausalLM
from maxtext.models.spec import ModelSpec


def test_bfloat16_compute_with_float32_weights_tracks_float32():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (1, 40)))
  results = {}
  for dtype in ("float32", "bfloat16"):
    spec = ModelSpec.from_config(load_config([f"dtype={dtype}", "weight_dtype=float32"]))
    variables = nn.unbox(model_params.init_variables(spec, jax.random.key(0)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    out = jax.jit(Qwen3NextForCausalLM(spec).apply)(variables, tokens)
    assert out.logits.dtype == jnp.dtype(dtype)
    results[dtype] = np.asarray(out.logits.astype(jnp.float32))
  scale = np.abs(results["float32"]).max()
  assert np.abs(results["bfloat16"] - results["float32"]).max() < 0.05 * scale


def test_bfloat16_weights_are_stored_in_bfloat16():
  spec = ModelSpec.from_config(load_config(["weight_dtype=bfloat16"]))
  shapes = jax.tree.leaves(nn.unbox(model_params.abstract_variables(spec)))
  assert all(x.dtype == jnp.bfloat16 for x in shapes)
