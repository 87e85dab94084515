"""Run by test_gated_delta_rule_sharded.py in a fresh process with 8 forced host devices.

Compares the dispatcher under an active (data, fsdp, tensor) mesh with the same call without a mesh, in values and
gradients, for each implementation given on the command line; prints one line per implementation.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from maxtext import sharding
from maxtext.kernels.gated_delta_rule import chunk_gated_delta_rule


def _inputs(seed: int, b: int, t: int, hk: int, hv: int, d: int):
  keys = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(keys[0], (b, t, hk, d), jnp.float32)
  k = jax.random.normal(keys[1], (b, t, hk, d), jnp.float32)
  v = jax.random.normal(keys[2], (b, t, hv, d), jnp.float32)
  g = -jax.nn.softplus(jax.random.normal(keys[3], (b, t, hv), jnp.float32))
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (b, t, hv), jnp.float32))
  h0 = jax.random.normal(keys[5], (b, hv, d, d), jnp.float32) * 0.1
  # Two documents in rows 0 and 2, one elsewhere.
  segments = np.ones((b, t), np.int32)
  segments[0, t // 3:] = 2
  segments[2, t // 2:] = 2
  return (q, k, v, g, beta, h0), jnp.asarray(segments)


def _loss(impl: str, segments):
  def loss(q, k, v, g, beta, h0):
    out, final = chunk_gated_delta_rule(q, k, v, g, beta, h0, segment_ids=segments, impl=impl, chunk_size=16)
    weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    return jnp.sum(out * weights) + jnp.sum(jnp.sin(final))

  return jax.value_and_grad(loss, argnums=tuple(range(6)))


def main(impls: list[str]) -> None:
  args, segments = _inputs(0, b=4, t=40, hk=2, hv=4, d=16)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2, "expert": 1})
  for impl in impls:
    expected_loss, expected_grads = jax.jit(_loss(impl, segments))(*args)
    token = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    gate = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
    state = NamedSharding(mesh, P(("data", "fsdp"), "tensor", None, None))
    placed = [jax.device_put(x, s) for x, s in zip(args, (token, token, token, gate, gate, state))]
    with sharding.activate(mesh):
      step = jax.jit(_loss(impl, jax.device_put(segments, NamedSharding(mesh, P(("data", "fsdp"), None)))))
      mapped = "shard_map" in str(jax.make_jaxpr(step)(*placed))
      loss, grads = step(*placed)
    loss_err = abs(float(loss) - float(expected_loss)) / abs(float(expected_loss))
    grad_err = max(
        float(jnp.linalg.norm(a - e) / jnp.linalg.norm(e)) for a, e in zip(grads, expected_grads)
    )
    print(f"{impl}: shard_map={mapped} loss_rel_err={loss_err:.2e} grad_rel_err={grad_err:.2e}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
