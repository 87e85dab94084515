"""Compile the gated delta rule's TPU kernels for a TPU topology without a TPU (ahead of time, with libtpu).

Lowers and compiles the inter-chunk kernels forward and backward at production shapes inside
jax.jit(jax.shard_map(...)) over a (batch, heads) mesh, and the public op's forward+backward through the
dispatcher (impl 'tpu': the chunk algebra and the recurrence as Pallas kernels), and prints per compile whether
the HLO holds the Mosaic custom calls and the memory analysis; for the op also which Pallas kernels it calls and
how many XLA instructions of the chunk algebra are left (`chunk_algebra_ops`). benchmarks/gated_delta_rule_tpu_cost.py
compares the op and the GDN layer before/after with XLA's cost analysis. Needs libtpu and a fresh process:
  JAX_PLATFORMS=cpu TPU_WORKER_HOSTNAMES=localhost python -m maxtext.kernels.gated_delta_rule.tpu_aot_check
(tests/kernels/test_gated_delta_rule_tpu.py does so in a subprocess).
"""

from __future__ import annotations

import argparse
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxtext import sharding
from maxtext.kernels.gated_delta_rule import chunk_gated_delta_rule
from maxtext.kernels.gated_delta_rule.tpu import inter_chunk_backward_tpu, inter_chunk_forward_tpu

MOSAIC_CALL = "tpu_custom_call"
_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


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


def model_mesh(topology: str, batch_shards: int) -> Mesh:
  """Our mesh axes over the topology: batch over fsdp, the rest (heads) over tensor."""
  devices = topology_devices(topology)
  return sharding.make_mesh({"data": 1, "fsdp": batch_shards, "tensor": -1, "expert": 1}, devices=list(devices.flat))


def dispatched_train_report(topology: str, batch_shards: int, shape: tuple[int, ...], dtype, chunk_size: int) -> str:
  """Report line of `compile_dispatched_op(..., impl='tpu')`, with its Pallas kernels and chunk-algebra XLA ops."""
  compiled = compile_dispatched_op(topology, batch_shards, shape, dtype, "tpu", chunk_size)
  mesh_shape = dict(model_mesh(topology, batch_shards).shape)
  text = compiled.as_text()
  return (_report_line(f"dispatched fwd+bwd (model layout, mesh {mesh_shape})", compiled)
          + f" pallas_kernels={','.join(pallas_kernels(text))} chunk_algebra_xla_ops="
          + str(len(chunk_algebra_ops(text, chunk_size))))


def compile_dispatched_op(topology: str, batch_shards: int, shape: tuple[int, ...], dtype, impl: str,
                          chunk_size: int = 64):
  """Compile value_and_grad of the public `chunk_gated_delta_rule(impl=impl)` on model-layout inputs.

  The inputs carry NamedShardings of our mesh axes (batch over fsdp, heads over tensor) and the logical rules are
  active, so this checks the dispatcher's own shard_map wrapping, not one written here.
  """
  b, t, hk, hv, dk, dv = shape
  mesh = model_mesh(topology, batch_shards)
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
    out, final = chunk_gated_delta_rule(q, k, v, g, beta, state, segment_ids=segments, chunk_size=chunk_size,
                                        impl=impl)
    return jnp.sum(out.astype(f32) ** 2) + jnp.sum(final**2)

  with sharding.activate(mesh):
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5)))
    return step.lower(q, q, v, g, beta, state, segments).compile()


def chunk_algebra_ops(hlo_text: str, chunk: int) -> list[str]:
  """XLA instructions of the chunk algebra in compiled HLO text: every triangular-solve, and every dot or
  convolution with an operand or result holding two dims of the chunk size ([.., C, C] tiles: k k^T, q k^T, the
  inverse and its products). Pallas kernels are custom calls, so they never match."""
  found = []
  for line in hlo_text.splitlines():
    if "triangular-solve(" in line:
      found.append(line.strip())
    elif " dot(" in line or " convolution(" in line:
      dims = ([int(d) for d in m.group(1).split(",") if d] for m in _SHAPE.finditer(line))
      if any(sum(d == chunk for d in shape) >= 2 for shape in dims):
        found.append(line.strip())
  return found


def pallas_kernels(hlo_text: str) -> list[str]:
  """Names of the Mosaic kernels a compiled program calls, sorted, unique."""
  pattern = re.compile(r"^\s*%?([\w\-]+?)(?:\.\d+)? = .*custom_call_target=\"" + MOSAIC_CALL + '"')
  return sorted({m.group(1) for m in map(pattern.match, hlo_text.splitlines()) if m})


def _report_line(name: str, compiled) -> str:
  mem = compiled.memory_analysis()
  has_mosaic = MOSAIC_CALL in compiled.as_text()
  return (
      f"{name}: compiled {MOSAIC_CALL}={has_mosaic} temp_bytes={mem.temp_size_in_bytes} "
      f"argument_bytes={mem.argument_size_in_bytes} output_bytes={mem.output_size_in_bytes}"
  )


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
  return _report_line(name, fn.lower(*args).compile())


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
  print(dispatched_train_report(args.topology, args.batch_shards, (b, n * c, h // 2, h, dk, dv), io, c))

if __name__ == "__main__":
  main()
