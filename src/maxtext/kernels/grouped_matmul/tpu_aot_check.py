"""Compile the MoE layer's megablox path for a TPU topology without a TPU (ahead of time, with libtpu).

Lowers and compiles forward + backward of one SparseMoe layer (sparse_matmul, megablox) inside a sharded jit over
a (fsdp, expert) mesh of a deviceless v5p topology, parameters laid out by the logical axis rules, and prints
whether the compiled HLO holds the Mosaic custom call and the all-to-all of expert parallelism, with the memory
analysis. Needs libtpu and a fresh process:
  JAX_PLATFORMS=cpu TPU_WORKER_HOSTNAMES=localhost python -m maxtext.kernels.grouped_matmul.tpu_aot_check
(tests/kernels/test_grouped_matmul_tpu.py does so in a subprocess).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import linen as nn

from maxtext import sharding
from maxtext.kernels.gated_delta_rule.tpu_aot_check import tpu_mesh
from maxtext.layers.moe import SparseMoe
from maxtext.layers.specs import MoeSpec, Numerics

MOSAIC_CALL = "tpu_custom_call"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5p:2x2x1")
  parser.add_argument("--expert-shards", type=int, default=2, help="mesh size on expert; the rest is on fsdp")
  parser.add_argument("--shape", default="4,1024,2048", help="batch,length,hidden of the layer's input")
  parser.add_argument("--experts", default="512,10,512", help="experts,top_k,expert hidden")
  args = parser.parse_args(argv)
  batch, length, hidden = (int(v) for v in args.shape.split(","))
  num_experts, top_k, expert_dim = (int(v) for v in args.experts.split(","))
  devices = tpu_mesh(args.topology, 1).devices.flat
  expert = args.expert_shards
  mesh = sharding.make_mesh({"data": 1, "fsdp": len(devices) // expert, "tensor": 1, "expert": expert}, devices)
  print(f"jax {jax.__version__}; {len(devices)} x {devices[0].device_kind}; mesh {dict(mesh.shape)}")

  spec = MoeSpec(num_experts, top_k, True, expert_dim, expert_dim, impl="megablox")
  layer = SparseMoe(spec, Numerics(jnp.bfloat16, jnp.float32))
  x_struct = jax.ShapeDtypeStruct((batch, length, hidden), jnp.bfloat16)
  boxed = jax.eval_shape(layer.init, jax.random.key(0), x_struct)
  shardings = sharding.logical_sharding(boxed, mesh)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed),
                        shardings)
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "expert")))
  x = jax.ShapeDtypeStruct(x_struct.shape, x_struct.dtype, sharding=batch_sharding)

  def loss(variables, x):
    out, stats = layer.apply(variables, x)
    return jnp.mean(out.astype(jnp.float32) ** 2) + jnp.sum(stats.prob_sums) * 0.0

  with sharding.activate(mesh):
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, x).compile()
  text = compiled.as_text()
  mem = compiled.memory_analysis()
  print(f"moe forward+backward: compiled {MOSAIC_CALL}={MOSAIC_CALL in text} all-to-all={'all-to-all' in text} "
        f"temp_bytes={mem.temp_size_in_bytes} argument_bytes={mem.argument_size_in_bytes} "
        f"output_bytes={mem.output_size_in_bytes}")


if __name__ == "__main__":
  main()
