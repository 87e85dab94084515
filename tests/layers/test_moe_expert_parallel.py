"""Expert parallelism: on 8 forced host devices the MoE layer's output and gradients equal the single-device ones.

Runs in a subprocess (XLA_FLAGS must be set before jax is imported; the test session has 4 devices). The whole
model's train step on such meshes is tests/trainers/test_mesh_equivalence.py.
"""

import os
import subprocess
import sys

import numpy as np

# (mesh axes, grouped matmul impl): experts split 4 ways beside 2-way data, 8 ways alone, and a Pallas kernel
# (interpret mode) inside the shard_map.
CASES = (({"data": 2, "expert": 4}, "reference"), ({"expert": 8}, "reference"), ({"data": 2, "expert": 4}, "gpu"))


def run_cases() -> None:
  import dataclasses

  import jax
  import jax.numpy as jnp

  from maxtext import sharding
  from maxtext.layers.moe import SparseMoe
  from maxtext.layers.specs import MoeSpec, Numerics
  from tests.layers.test_moe import relative_error

  assert jax.device_count() == 8, jax.devices()
  spec = MoeSpec(num_experts=16, top_k=3, norm_topk_prob=True, expert_dim=16, shared_expert_dim=16)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((8, 6, 32)), jnp.float32)  # 48 tokens: 6 per device on 8 devices
  cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  shapes = jax.eval_shape(SparseMoe(spec).init, jax.random.key(0), x)
  from flax import linen as nn

  params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) / np.sqrt(a.shape[-2]), jnp.float32),
                        nn.unbox(shapes)["params"])

  def value_and_grads(impl: str):
    layer = SparseMoe(dataclasses.replace(spec, impl=impl), Numerics())

    def loss(params, x):
      out, _ = layer.apply({"params": params}, x)
      return jnp.sum(out * cotangent), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  (_, expected), expected_grads = value_and_grads("reference")(params, x)
  for axes, impl in CASES:
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, **axes})
    with sharding.activate(mesh):
      fn = value_and_grads(impl)
      hlo = fn.lower(params, x).compile().as_text()
      (_, out), grads = fn(params, x)
    assert "all-to-all" in hlo, f"{axes}: no all-to-all in the compiled program"
    errors = [relative_error(out, expected)] + [
        relative_error(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads))]
    assert max(errors) < 1e-5, (axes, impl, errors)
    print(f"OK {axes} {impl}: max relative error {max(errors):.1e} over output and {len(errors) - 1} gradients")


def test_expert_parallel_matches_single_device():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, "-c", "from tests.layers.test_moe_expert_parallel import run_cases; run_cases()"]
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=600)
  print(result.stdout)
  assert result.returncode == 0, result.stdout + result.stderr[-4000:]
  assert result.stdout.count("OK ") == len(CASES), result.stdout
