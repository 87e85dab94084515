"""Run by test_context_parallel.py in a fresh process with 8 forced host devices.

The gated delta rule and attention ops under a mesh whose `context` axis splits the sequence, against the same
calls without a mesh: values and gradients (of every input, the initial state included), float32. The sequences
hold packed documents that cross shard boundaries and one that starts exactly at a boundary, and their length is
no multiple of chunk x shards. Prints one line per case.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from maxtext import sharding
from maxtext.kernels.attention import dot_product_attention
from maxtext.kernels.gated_delta_rule import chunk_gated_delta_rule

LENGTH = 40  # 5 tokens a shard on 8 devices; chunks of 16


def _segments(batch: int, length: int) -> np.ndarray:
  """Row 0: documents starting at 7 (inside the first shard) and at length / 2 (a shard boundary for 2, 4 and 8
  shards); row 1: one document; the rest: a new document every 9 tokens (crossing boundaries)."""
  ids = np.ones((batch, length), np.int32)
  ids[0, 7:] = 2
  ids[0, length // 2:] = 3
  ids[2:] = 1 + np.arange(length) // 9
  return ids


def _gdn_inputs(b: int, hk: int, hv: int, d: int):
  keys = jax.random.split(jax.random.key(0), 6)
  q = jax.random.normal(keys[0], (b, LENGTH, hk, d), jnp.float32)
  k = jax.random.normal(keys[1], (b, LENGTH, hk, d), jnp.float32)
  v = jax.random.normal(keys[2], (b, LENGTH, hv, d), jnp.float32)
  g = -jax.nn.softplus(jax.random.normal(keys[3], (b, LENGTH, hv), jnp.float32)) * 0.3
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (b, LENGTH, hv), jnp.float32))
  h0 = jax.random.normal(keys[5], (b, hv, d, d), jnp.float32) * 0.3
  return q, k, v, g, beta, h0


def _weights(shape, seed):
  return jnp.cos(jnp.arange(np.prod(shape), dtype=jnp.float32) * (0.37 + seed)).reshape(shape)


def _gdn_loss(impl: str, with_segments: bool):
  def loss(q, k, v, g, beta, h0, ids):
    out, final = chunk_gated_delta_rule(q, k, v, g, beta, h0, segment_ids=ids if with_segments else None,
                                        impl=impl, chunk_size=16)
    return jnp.sum(out * _weights(out.shape, 0)) + jnp.sum(final * _weights(final.shape, 1))

  return jax.value_and_grad(loss, argnums=tuple(range(6)))


def _attention_loss(impl: str):
  def loss(q, k, v, ids):
    out = dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, segment_ids=ids, impl=impl)
    return jnp.sum(out * _weights(out.shape, 0))

  return jax.value_and_grad(loss, argnums=(0, 1, 2))


def _errors(loss, grads, expected_loss, expected_grads) -> tuple[float, float]:
  loss_err = abs(float(loss) - float(expected_loss)) / abs(float(expected_loss))
  grad_err = max(float(jnp.linalg.norm(a - e) / jnp.linalg.norm(e)) for a, e in zip(grads, expected_grads))
  return loss_err, grad_err


def _mesh(axes: dict[str, int]):
  size = int(np.prod(list(axes.values())))
  return sharding.make_mesh(axes, jax.devices()[:size])


def _place(mesh, arrays, specs):
  return [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(arrays, specs)]


def check_gdn(name: str, axes: dict[str, int], impl: str, with_segments: bool = True) -> None:
  batch = 4
  args = _gdn_inputs(batch, hk=2, hv=4, d=8)
  ids = jnp.asarray(_segments(batch, LENGTH))
  expected_loss, expected_grads = jax.jit(_gdn_loss(impl, with_segments))(*args, ids)
  mesh = _mesh(axes)
  rows = ("data", "fsdp")
  token, gate = P(rows, "context", "tensor", None), P(rows, "context", "tensor")
  placed = _place(mesh, (*args, ids), (token, token, token, gate, gate, P(rows, "tensor"), P(rows, "context")))
  with sharding.activate(mesh):
    step = jax.jit(_gdn_loss(impl, with_segments))
    text = str(step.lower(*placed).as_text())
    loss, grads = step(*placed)
  loss_err, grad_err = _errors(loss, grads, expected_loss, expected_grads)
  collective = "all_gather" in text or "all-gather" in text
  print(f"gdn {name} {impl}: all_gather={collective} loss_rel_err={loss_err:.2e} grad_rel_err={grad_err:.2e}",
        flush=True)


def check_attention(name: str, axes: dict[str, int], impl: str) -> None:
  batch, heads, kv_heads, dim = 4, 4, 2, 8
  # Splash tiles queries in 128s: its case gives each of 2 shards 128 queries.
  length = 256 if impl == "tpu" else LENGTH
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (batch, length, heads, dim), jnp.float32)
  k = jax.random.normal(keys[1], (batch, length, kv_heads, dim), jnp.float32)
  v = jax.random.normal(keys[2], (batch, length, kv_heads, dim), jnp.float32)
  ids = jnp.asarray(_segments(batch, length))
  expected_loss, expected_grads = jax.jit(_attention_loss(impl))(q, k, v, ids)
  mesh = _mesh(axes)
  rows = ("data", "fsdp")
  token = P(rows, "context", "tensor", None)
  placed = _place(mesh, (q, k, v, ids), (token, token, token, P(rows, "context")))
  with sharding.activate(mesh):
    step = jax.jit(_attention_loss(impl))
    text = str(step.lower(*placed).as_text())
    loss, grads = step(*placed)
  loss_err, grad_err = _errors(loss, grads, expected_loss, expected_grads)
  collective = "all_gather" in text or "all-gather" in text
  print(f"attention {name} {impl}: all_gather={collective} loss_rel_err={loss_err:.2e} grad_rel_err={grad_err:.2e}",
        flush=True)


CASES = {
    "context2": {"context": 2},
    "context4": {"context": 4},
    "context8": {"context": 8},
    "data2_context2_tensor2": {"data": 2, "context": 2, "tensor": 2},
}


def main(which: list[str]) -> None:
  assert jax.device_count() == 8, jax.devices()
  for case in which:
    op, name, impl = case.split(":")
    if op == "gdn":
      check_gdn(name, CASES[name], impl)
    else:
      check_attention(name, CASES[name], impl)


if __name__ == "__main__":
  main(sys.argv[1:])
