"""Logical axis rules place parameters and activations on the mesh; sharded layers compute what unsharded do."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from maxtext import sharding
from maxtext.configs import load_config
from maxtext.layers.decoder_layer import FULL_ATTENTION, LINEAR_ATTENTION, DecoderLayer
from maxtext.layers.rotary import rotary_cos_sin
from maxtext.models import params as model_params
from maxtext.models.qwen3_next import Qwen3NextForCausalLM
from maxtext.models.spec import ModelSpec

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs XLA_FLAGS host device count >= 4 (conftest)")


def tiny_spec(**overrides):
  return ModelSpec.from_config(load_config(overrides={"dtype": "float32", **overrides}))


def mesh_of(**axes):
  sizes = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, **axes}
  return sharding.make_mesh(sizes, jax.devices()[: int(np.prod(list(sizes.values())))])


def test_parameter_shardings_follow_the_rules():
  spec = tiny_spec(scan_layers=True)
  shardings = model_params.flatten(sharding.logical_sharding(model_params.abstract_variables(spec), mesh_of(fsdp=2, tensor=2)))
  block = "params/decoder/blocks/layer_0"
  attention = "params/decoder/blocks/layer_3"
  expected = {
      "params/token_embedder/embedding": P("tensor", ("fsdp", "context")),
      "params/lm_head/kernel": P(("fsdp", "context"), "tensor"),
      f"{block}/linear_attn/in_proj_qkvz/kernel": P(None, ("fsdp", "context"), "tensor", None),
      f"{block}/linear_attn/out_proj/kernel": P(None, "tensor", None, ("fsdp", "context")),
      f"{block}/linear_attn/A_log": P(None, "tensor"),
      f"{block}/mlp/experts/gate_proj": P(None, "expert", ("fsdp", "context"), "tensor"),
      f"{block}/mlp/experts/down_proj": P(None, "expert", "tensor", ("fsdp", "context")),
      f"{attention}/self_attn/q_proj/kernel": P(None, ("fsdp", "context"), "tensor", None),
      f"{attention}/self_attn/k_proj/kernel": P(None, ("fsdp", "context"), "tensor", None),
      f"{attention}/self_attn/o_proj/kernel": P(None, "tensor", None, ("fsdp", "context")),
      "params/norm/scale": P(None),
  }
  for path, spec_ in expected.items():
    assert shardings[path].spec == spec_, path


def test_sharded_model_compiles_with_rule_shardings():
  spec = tiny_spec(scan_layers=True)
  mesh = mesh_of(data=1, fsdp=2, tensor=2)
  abstract = model_params.abstract_variables(spec)
  shardings = sharding.logical_sharding(abstract, mesh)
  params = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(abstract), shardings
  )
  tokens = jax.ShapeDtypeStruct((4, 32), jnp.int32)
  with sharding.activate(mesh):
    compiled = jax.jit(lambda v, t: Qwen3NextForCausalLM(spec).apply(v, t)).lower(params, tokens).compile()
  placed = jax.tree_util.tree_leaves_with_path(compiled.input_shardings[0][0])
  expected = jax.tree.leaves(shardings)
  arrays = jax.tree.leaves(params)
  assert len(placed) == len(expected) == len(arrays)
  for (path, got), want, array in zip(placed, expected, arrays):
    assert got.is_equivalent_to(want, array.ndim), jax.tree_util.keystr(path)


@pytest.mark.parametrize("layer_type", [LINEAR_ATTENTION, FULL_ATTENTION])
def test_sharded_decoder_layer_matches_unsharded(layer_type):
  spec = tiny_spec()
  layer = DecoderLayer(layer_type, spec.attention, spec.gated_delta_net, spec.moe, spec.eps, spec.numerics)
  x = jax.random.normal(jax.random.key(1), (2, 24, spec.emb_dim))
  cos, sin = rotary_cos_sin(jnp.broadcast_to(jnp.arange(24), (2, 24)), spec.attention.rotary_dim, spec.rope_theta)
  boxed = layer.init(jax.random.key(0), x, cos, sin)
  expected, _ = layer.apply(nn.unbox(boxed), x, cos, sin)

  mesh = mesh_of(tensor=2)
  variables, _ = sharding.init_sharded(lambda r: layer.init(r, x, cos, sin), boxed, mesh, jax.random.key(0))
  kernel = variables["params"]["mlp"]["shared_expert"]["gate_proj"]["kernel"]
  assert kernel.sharding.spec == P(("fsdp", "context"), "tensor") and kernel.sharding.shard_shape(kernel.shape)[1] == kernel.shape[1] // 2
  with sharding.activate(mesh):
    out, _ = jax.jit(lambda v, x: layer.apply(v, x, cos, sin))(variables, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_mesh_shape_rejects_a_product_that_does_not_match_the_devices():
  with pytest.raises(ValueError, match="multiply to 6, but there are 4 devices"):
    sharding.mesh_shape({"data": 1, "fsdp": 3, "tensor": 2, "expert": 1}, 4)
  assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 2, "expert": 1}, 4) == (1, 2, 1, 2, 1)  # (data, fsdp, context, tensor, expert)
