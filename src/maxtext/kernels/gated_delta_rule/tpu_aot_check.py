"""Compile the inter-chunk TPU kernels for a TPU topology without a TPU (ahead of time, with libtpu).

Lowers and compiles forward and backward at production shapes inside jax.jit(jax.shard_map(...)) over a
(batch, heads) mesh and prints, per kernel, whether the compiled HLO holds the Mosaic custom call and the
memory analysis. Needs libtpu and must run in a fresh process with
  JAX_PLATFORMS=cpu TPU_WORKER_HOSTNAMES=localhost python -m maxtext.kernels.gated_delta_rule.tpu_aot_check
(tests/kernels/test_gated_delta_rule_tpu.py does so in a subprocess).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxtext import sharding
from maxtext.kernels.gated_delta_rule import chunk_gated_delta_rule
from maxtext.kernels.gated_delta_rule.tpu import inter_chunk_backward_tpu, inter_chunk_forward_tpu

MOSAIC_CALL = "tpu_custom_call"


def topology_devices(topology: str) -> np.ndarray:
  """The devices of a deviceless v5p topology such as 'v5p:2x2x1'."""
  bounds = tuple(int(x) for x in topology.split(":")[1].split("x"))
  topo = topologies.get_topology_desc(
      platform="tpu", topology_name=topology, chip_config_name="megacore", chips_per_host_bounds=bounds,
      num_slices=1, wrap=(False, False, False),
  )
  return np.array(topo.devices)


def tpu_mesh(topology: str, batch_shards: int) -> Mesh:
  """A (batch, heads) mesh over the devices of a deviceless v5p topology."""
  return Mesh(topology_devices(topology).reshape(batch_shards, -1), ("batch", "heads"))


def dispatched_train_report(topology: str, batch_shards: int, shape: tuple[int, ...], dtype) -> str:
  """Compile value_and_grad of the public `chunk_gated_delta_rule(impl='tpu')` on model-layout inputs.

  The inputs carry NamedShardings of our mesh axes (batch over fsdp, heads over tensor) and the logical rules are
  active, so this checks the dispatcher's own shard_map wrapping, not one written here.
  """
  b, t, hk, hv, dk, dv = shape
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(
      {"data": 1, "fsdp": batch_shards, "tensor": -1, "expert": 1}, devices=list(devices.flat)
  )
  f32 = jnp.float32
  spec = lambda *axes: NamedSharding(mesh, P(*axes))
  batch_heads = lambda shape_, dt: jax.ShapeDtypeStruct(
      shape_, dt, sharding=spec("fsdp", None, "tensor", *([None] * (len(shape_) - 3)))
  )
  q, v = batch_heads((b, t, hk, dk), dtype), batch_heads((b, t, hv, dv), dtype)
  g, beta = batch_heads((b, t, hv), f32), batch_heads((b, t, hv), dtype)
  state = jax.ShapeDtypeStruct((b, hv, dk, dv), f32, sharding=spec("fsdp", "tensor", None, None))
  segments = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=spec("fsdp", None))

  def loss(q, k, v, g, beta, state, segments):
    out, final = chunk_gated_delta_rule(q, k, v, g, beta, state, segment_ids=segments, impl="tpu")
    return jnp.sum(out.astype(f32) ** 2) + jnp.sum(final**2)

  with sharding.activate(mesh):
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5)))
    return compile_report("dispatched fwd+bwd (model layout, mesh " + str(dict(mesh.shape)) + ")", step,
                          (q, q, v, g, beta, state, segments))


def _abstract(mesh: Mesh, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
  # Every kernel operand starts with [B, H]: batch over one mesh axis, heads over the other.
  spec = P("batch", "heads", *([None] * (len(shape) - 2)))
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _sharded(fn, mesh: Mesh, num_args: int):
  """jit(shard_map(fn)) with every operand and result split over (batch, heads) on its two leading dims."""
  spec = P("batch", "heads")
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * num_args, out_specs=spec))


def compile_report(name: str, fn, args) -> str:
  """Lower and compile `fn` on abstract `args`; a one-line report with the Mosaic check and memory numbers."""
  compiled = fn.lower(*args).compile()
  mem = compiled.memory_analysis()
  has_mosaic = MOSAIC_CALL in compiled.as_text()
  return (
      f"{name}: compiled {MOSAIC_CALL}={has_mosaic} temp_bytes={mem.temp_size_in_bytes} "
      f"argument_bytes={mem.argument_size_in_bytes} output_bytes={mem.output_size_in_bytes}"
  )


def main(argv: list[str] | None = None) -> None:
  """Compile forward and backward for the given topology and print one report line each."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5p:2x2x1")
  parser.add_argument("--batch-shards", type=int, default=2, help="mesh size on batch; the rest is on heads")
  parser.add_argument("--dtype", default="bfloat16", help="dtype of q, k, w, u, intra and d_out")
  parser.add_argument("--shape", default="4,32,64,64,128,128", help="B,H,N,C,Dk,Dv")
  args = parser.parse_args(argv)
  b, h, n, c, dk, dv = (int(x) for x in args.shape.split(","))
  mesh = tpu_mesh(args.topology, args.batch_shards)
  print(f"jax {jax.__version__}; {len(mesh.devices.flat)} x {mesh.devices.flat[0].device_kind}; mesh {mesh.shape}")
  io, f32 = jnp.dtype(args.dtype), jnp.float32
  a = functools.partial(_abstract, mesh)
  key, value, square = a((b, h, n, c, dk), io), a((b, h, n, c, dv), io), a((b, h, n, c, c), io)
  decay, state = a((b, h, n), f32), a((b, h, dk, dv), f32)
  forward = _sharded(lambda *x: tuple(inter_chunk_forward_tpu(*x)), mesh, 7)
  print(compile_report("forward", forward, (key, key, key, value, square, decay, state)))
  states, v_new = a((b, h, n, dk, dv), f32), a((b, h, n, c, dv), f32)
  backward = _sharded(lambda *x: tuple(inter_chunk_backward_tpu(*x)), mesh, 9)
  print(compile_report("backward", backward, (key, key, key, square, decay, states, v_new, value, state)))
  print(dispatched_train_report(args.topology, args.batch_shards, (b, n * c, h // 2, h, dk, dv), io))


if __name__ == "__main__":
  main()
