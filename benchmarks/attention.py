"""Causal GQA attention on a GPU: ours (cuDNN through impl='gpu') against tokamax and XLA, in one run.

Usage: python benchmarks/attention.py [--batch 1] [--length 8192] [--heads 16] [--kv-heads 2] [--head-dim 256]
           [--documents 4] [--json out.json] [--markdown out.md] [--no-tokamax]
1. Checks the output and the gradients of q, k, v of every implementation against our jnp reference run in
   float32 on the same bf16 inputs (max |ours - ref| / max |ref|), causal and packed (--documents segments of
   random lengths per row, through segment ids: a same-segment mask for cuDNN).
2. Times forward and forward+backward (ms, median of 5 runs of back-to-back calls; TFLOP/s counts the causal half).
Peers: jax.nn.dot_product_attention(implementation='xla'), tokamax.dot_product_attention (default choice, and
'triton'), where tokamax is importable (pip install --no-index --no-deps --target /tmp/site .whl/*.whl and put
/tmp/site on PYTHONPATH). Prints the table last. On a CPU it is only a smoke test of this script.
"""

from __future__ import annotations

import argparse
import json
import traceback
from collections.abc import Callable

import numpy as np

from timing import time_jax


def implementations(scale: float, with_tokamax: bool) -> dict[str, Callable]:
  """name -> (q, k, v, segment_ids or None) -> out; None segment support is marked by raising NotImplementedError."""
  import jax
  from maxtext.kernels.attention import dot_product_attention

  def ours(q, k, v, ids):
    return dot_product_attention(q, k, v, scale=scale, segment_ids=ids, impl="gpu")

  def xla(q, k, v, ids):
    if ids is not None:
      mask = ids[:, None, :, None] == ids[:, None, None, :]  # [B, 1, T, S]
      return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True, implementation="xla")
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="xla")

  impls = {"ours (cuDNN)": ours, "XLA (jax.nn)": xla}
  if with_tokamax:
    try:
      import tokamax
    except ImportError as e:
      print(f"tokamax not importable ({e}); skipping it")
    else:
      def peer(implementation):
        def run(q, k, v, ids):
          if ids is not None:
            raise NotImplementedError("segment ids: not compared")
          return tokamax.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=implementation)
        return run
      impls["tokamax (default)"] = peer(None)
      impls["tokamax (triton)"] = peer("triton")
  return impls


def make_inputs(args, seed: int = 0):
  import jax.numpy as jnp
  rng = np.random.default_rng(seed)
  shape = lambda heads: (args.batch, args.length, heads, args.head_dim)
  q, k, v, d_out = (jnp.asarray(rng.standard_normal(shape(h)), jnp.bfloat16)
                    for h in (args.heads, args.kv_heads, args.kv_heads, args.heads))
  # Packed rows: `documents` runs of random lengths, ids 1.. (the packer's layout).
  ids = np.zeros((args.batch, args.length), np.int32)
  for row in range(args.batch):
    cuts = np.sort(rng.choice(np.arange(1, args.length), args.documents - 1, replace=False))
    for doc, (start, end) in enumerate(zip([0, *cuts], [*cuts, args.length])):
      ids[row, start:end] = doc + 1
  return q, k, v, d_out, jnp.asarray(ids)


def forward_and_grads(run: Callable) -> tuple[Callable, Callable]:
  import jax
  import jax.numpy as jnp
  forward = jax.jit(lambda q, k, v, ids: run(q, k, v, ids))

  def loss(q, k, v, ids, d_out):
    return jnp.sum(run(q, k, v, ids).astype(jnp.float32) * d_out.astype(jnp.float32))

  both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  return forward, both


def relative(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--length", type=int, default=8192)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--head-dim", type=int, default=256)
  parser.add_argument("--documents", type=int, default=4, help="segments per packed row")
  parser.add_argument("--json", help="write the results here")
  parser.add_argument("--markdown", help="write the table here")
  parser.add_argument("--no-tokamax", action="store_true")
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  from maxtext.kernels.attention import dot_product_attention_reference

  scale = args.head_dim**-0.5
  q, k, v, d_out, ids = make_inputs(args)
  f32 = lambda x: x.astype(jnp.float32)
  reference_forward, reference_both = forward_and_grads(
      lambda q, k, v, ids: dot_product_attention_reference(f32(q), f32(k), f32(v), scale=scale, q_segment_ids=ids)
  )
  device = jax.devices()[0].device_kind
  print(f"jax {jax.__version__} on {device}; B={args.batch} T={args.length} Hq={args.heads} Hkv={args.kv_heads}"
        f" D={args.head_dim} bf16, causal; packed: {args.documents} documents per row")
  causal_flops = 4 * args.batch * args.length * args.length / 2 * args.heads * args.head_dim
  rows = []
  for name, run in implementations(scale, not args.no_tokamax).items():
    forward, both = forward_and_grads(run)
    for packed in (False, True):
      segment_ids = ids if packed else None
      row = {"impl": name, "packed": packed}
      try:
        ref_grads = reference_both(q, k, v, segment_ids, d_out)[1]
        row["out_err"] = relative(forward(q, k, v, segment_ids), reference_forward(q, k, v, segment_ids))
        grads = both(q, k, v, segment_ids, d_out)[1]
        row["grad_err"] = max(relative(a, b) for a, b in zip(grads, ref_grads))
        row["fwd_ms"] = time_jax(forward, q, k, v, segment_ids)
        row["fwd_bwd_ms"] = time_jax(both, q, k, v, segment_ids, d_out)
        row["fwd_tflops"] = causal_flops / row["fwd_ms"] / 1e9
        row["fwd_bwd_tflops"] = 3.5 * causal_flops / row["fwd_bwd_ms"] / 1e9  # bwd: 5 matmuls of the 2 forward
      except NotImplementedError as e:
        row["note"] = str(e)
      except Exception as e:  # noqa: BLE001 - a failing peer must not hide the others' numbers
        row["note"] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        traceback.print_exc()
      rows.append(row)
      print(json.dumps(row), flush=True)

  fmt = lambda x, spec: "-" if x is None else format(x, spec)
  lines = [
      f"Causal GQA attention, {device}, jax {jax.__version__}: B={args.batch} T={args.length} Hq={args.heads}"
      f" Hkv={args.kv_heads} D={args.head_dim} bf16 (errors: max-relative vs the float32 reference)",
      "| impl | packed | out err | grad err | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | note |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['impl']} | {'yes' if r['packed'] else 'no'} | {fmt(r.get('out_err'), '.1e')} |"
        f" {fmt(r.get('grad_err'), '.1e')} | {fmt(r.get('fwd_ms'), '.2f')} | {fmt(r.get('fwd_bwd_ms'), '.2f')} |"
        f" {fmt(r.get('fwd_tflops'), '.0f')} | {fmt(r.get('fwd_bwd_tflops'), '.0f')} | {r.get('note', '')} |"
    )
  table = "\n".join(lines)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": device, "jax": jax.__version__, "args": vars(args), "rows": rows}, f, indent=1)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  main()
