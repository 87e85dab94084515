"""Gated delta rule on TPU without a TPU: XLA's cost analysis of the compiled op and GDN layer, before and after.

Usage: python benchmarks/gated_delta_rule_tpu_cost.py [--topology v5p:2x2x1] [--shape 4,4096,16,32,128,128]
           [--embed 2048] [--docs docs/benchmarks.md]
Compiles forward+backward of (1) the public op `chunk_gated_delta_rule` on packed bf16 inputs with an initial
state and (2) a GatedDeltaNet layer (projections, conv, op, gated norm) on packed bf16 inputs, for a deviceless
TPU topology (libtpu on this CPU; JAX_PLATFORMS=cpu, TPU_WORKER_HOSTNAMES=localhost and ALLOW_MULTIPLE_LIBTPU_LOAD=1
are set here when unset), each
with impl 'tpu_jnp_algebra' (before: the chunk algebra as jnp under XLA around the Pallas recurrence) and 'tpu'
(after: the chunk algebra as Pallas kernels too). Prints per compile the Pallas kernels called, the XLA
dot / triangular-solve instructions of the chunk algebra left (tpu_aot_check.chunk_algebra_ops), and XLA's cost
analysis of one chip's program: flops, bytes accessed, transcendentals, and the temporary memory. The Pallas kernels
report their own flops and bytes (pl.CostEstimate, what one pass over their operands moves), XLA counts the rest:
no timing, the best proxy for speed without the chip.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip to guard: other deviceless compiles may run

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from maxtext import sharding  # noqa: E402
from maxtext.kernels.gated_delta_rule import tpu_aot_check  # noqa: E402
from maxtext.layers.gated_delta_net import GatedDeltaNet  # noqa: E402
from maxtext.layers.specs import GatedDeltaNetSpec, Numerics  # noqa: E402

IMPLS = ("tpu_jnp_algebra", "tpu")  # before, after
COLUMNS = ("flops", "bytes accessed", "transcendentals", "temp")


def compile_gdn_layer(topology: str, batch_shards: int, shape: tuple[int, ...], embed: int, chunk: int, impl: str):
  """value_and_grad (parameters and input) of a GatedDeltaNet layer on packed bf16 inputs, compiled."""
  b, t, hk, hv, dk, dv = shape
  mesh = tpu_aot_check.model_mesh(topology, batch_shards)
  spec = GatedDeltaNetSpec(num_key_heads=hk, num_value_heads=hv, key_head_dim=dk, value_head_dim=dv,
                           conv_kernel=4, chunk_size=chunk, impl=impl)
  layer = GatedDeltaNet(spec, numerics=Numerics(dtype=jnp.bfloat16, weight_dtype=jnp.float32))
  x = jax.ShapeDtypeStruct((b, t, embed), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None, None)))
  segments = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=NamedSharding(mesh, P("fsdp", None)))
  boxed = jax.eval_shape(layer.init, jax.random.key(0), x, segments)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed),
                        sharding.logical_sharding(boxed, mesh))

  def loss(params, x, segments):
    return jnp.sum(layer.apply(params, x, segments).astype(jnp.float32) ** 2)

  with sharding.activate(mesh):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x, segments).compile()


def measure(compiled, chunk: int) -> dict:
  text = compiled.as_text()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
      "kernels": tpu_aot_check.pallas_kernels(text),
      "chunk_algebra_xla_ops": len(tpu_aot_check.chunk_algebra_ops(text, chunk)),
      "flops": cost.get("flops", 0.0),
      "bytes accessed": cost.get("bytes accessed", 0.0),
      "transcendentals": cost.get("transcendentals", 0.0),
      "temp": compiled.memory_analysis().temp_size_in_bytes,
  }


def _cell(column: str, value: float) -> str:
  if column == "flops":
    return f"{value / 1e9:.1f} G"
  if column == "transcendentals":
    return f"{value / 1e6:.1f} M"
  return f"{value / 2**30:.3f} GiB"


def table(rows: dict[tuple[str, str], dict]) -> list[str]:
  """Markdown rows: per compiled thing, before, after, and after / before."""
  lines = ["| compiled fwd+bwd | impl | Pallas kernels | chunk-algebra XLA ops | " + " | ".join(COLUMNS) + " |",
           "|---|---|---|---|" + "---|" * len(COLUMNS)]
  for what in dict.fromkeys(what for what, _ in rows):
    for impl in IMPLS:
      r = rows[what, impl]
      cells = [what, impl, " ".join(r["kernels"]) or "none", str(r["chunk_algebra_xla_ops"])]
      lines.append("| " + " | ".join(cells + [_cell(c, r[c]) for c in COLUMNS]) + " |")
    before, after = rows[what, IMPLS[0]], rows[what, IMPLS[1]]
    ratios = [f"{after[c] / before[c]:.2f}x" if before[c] else "-" for c in COLUMNS]
    lines.append(f"| {what} | after / before | | | " + " | ".join(ratios) + " |")
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5p:2x2x1")
  parser.add_argument("--batch-shards", type=int, default=2, help="fsdp size; the rest of the chips split heads")
  parser.add_argument("--shape", default="4,4096,16,32,128,128", help="B,T,Hk,Hv,Dk,Dv (Qwen3-Next's GDN heads)")
  parser.add_argument("--chunk", type=int, default=64)
  parser.add_argument("--embed", type=int, default=2048, help="the layer's model width")
  parser.add_argument("--docs", help="append the result section to this file (e.g. docs/benchmarks.md)")
  parser.add_argument("--date", default=datetime.date.today().isoformat())
  args = parser.parse_args()
  shape = tuple(int(x) for x in args.shape.split(","))
  mesh = tpu_aot_check.model_mesh(args.topology, args.batch_shards)
  rows = {}
  for impl in IMPLS:
    op = tpu_aot_check.compile_dispatched_op(args.topology, args.batch_shards, shape, jnp.bfloat16, impl, args.chunk)
    rows["op", impl] = measure(op, args.chunk)
  for impl in IMPLS:
    layer = compile_gdn_layer(args.topology, args.batch_shards, shape, args.embed, args.chunk, impl)
    rows["GDN layer", impl] = measure(layer, args.chunk)
  mesh_text = ", ".join(f"{k} {v}" for k, v in mesh.shape.items() if v > 1)
  header = (f"Deviceless {args.topology} ({mesh_text}; one chip's program), {args.date}, jax {jax.__version__}: "
            f"B x T {shape[0]} x {shape[1]}, Hk {shape[2]}, Hv {shape[3]}, Dk {shape[4]}, Dv {shape[5]}, chunk "
            f"{args.chunk}, bf16, packed segment ids; the op with an initial state, the layer with embed "
            f"{args.embed}.")
  lines = [header, "", *table(rows)]
  print("\n".join(lines))
  if args.docs:
    with open(args.docs, "a", encoding="utf-8") as f:
      title = f"Gated delta rule on TPU, deviceless: chunk algebra in Pallas, XLA cost before / after ({args.date})"
      command = " ".join(["python", "benchmarks/gated_delta_rule_tpu_cost.py", *sys.argv[1:]])
      f.write(f"\n## {title}\n\n`{command}`\n\n")
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
