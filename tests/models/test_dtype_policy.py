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


def _dot_precisions(dtype: str) -> list[str]:
  """The precision attribute of every dot_general in the lowered forward pass (training and one decode step)."""
  from maxtext.layers.decode_cache import DecodeContext  # noqa: PLC0415

  spec = ModelSpec.from_config(load_config([f"dtype={dtype}", "weight_dtype=float32", "vocab_size=64"]))
  model = Qwen3NextForCausalLM(spec)
  variables = model_params.abstract_variables(spec)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  texts = [jax.jit(model.apply).lower(nn.unbox(variables), tokens).as_text()]

  def step(variables, tokens):
    context = DecodeContext(jnp.zeros((1,), jnp.int32), jnp.ones((1, 8), bool), capacity=16)
    hidden, _ = model.apply(variables, tokens, tokens, None, context, method="decode_hidden")
    return model.apply(variables, hidden, method="logits_of")

  texts.append(jax.jit(step).lower(nn.unbox(variables), tokens).as_text())
  return [line.split("precision = ")[1].split("]")[0] + "]" for text in texts for line in text.splitlines()
          if "dot_general" in line and "precision = " in line]


def test_float32_compute_runs_every_matmul_in_float32():
  # JAX's default precision is TF32 on recent GPUs and bfloat16 passes on TPUs: a float32 config must ask for more.
  float32 = _dot_precisions("float32")
  assert float32 and all(p == "[HIGHEST, HIGHEST]" for p in float32), sorted(set(float32))
  assert "[DEFAULT, DEFAULT]" in _dot_precisions("bfloat16")  # 16-bit compute keeps the backend's default
