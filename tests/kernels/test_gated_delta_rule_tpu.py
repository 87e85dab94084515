"""The Pallas TPU inter-chunk kernels (interpret mode on CPU) against their jnp twin, and a deviceless TPU compile."""

import functools
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from maxtext.kernels.gated_delta_rule.inter_chunk import ForwardResult, inter_chunk_backward, inter_chunk_forward
from maxtext.kernels.gated_delta_rule.tpu import inter_chunk_backward_tpu, inter_chunk_forward_tpu

SHAPES = [
    # batch, heads, chunks, chunk size, key dim, value dim
    (2, 2, 1, 16, 16, 16),  # a single chunk: no carried state
    (2, 3, 3, 16, 32, 64),  # key dim != value dim
    (2, 2, 3, 64, 16, 16),  # production chunk size
    (1, 2, 2, 64, 128, 128),  # production chunk size and head dims
]
# Every shape in float32; bfloat16 inputs (checked against the reference on the same rounded inputs) on two.
CASES = [(shape, "float32") for shape in SHAPES] + [(SHAPES[1], "bfloat16"), (SHAPES[3], "bfloat16")]
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-3}


def relative_error(ours, reference) -> float:
  reference = np.asarray(reference, np.float64)
  return float(np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max())


def random_inputs(seed: int, shape: tuple[int, ...], dtype: str) -> dict[str, jax.Array]:
  """Realistic magnitudes: decay in (0, 1], small k and w so the state stays bounded over the chunks."""
  rng = np.random.default_rng(seed)
  b, h, n, c, dk, dv = shape
  normal = lambda scale, *dims: jnp.asarray(scale * rng.standard_normal(dims), dtype)
  return dict(
      q=normal(0.3, b, h, n, c, dk),
      k=normal(0.2, b, h, n, c, dk),
      w=normal(0.2, b, h, n, c, dk),
      u=normal(1.0, b, h, n, c, dv),
      intra=normal(0.2, b, h, n, c, c),
      decay=jnp.asarray(rng.uniform(0.05, 1.0, (b, h, n)), jnp.float32),
      h0=normal(1.0, b, h, dk, dv),
      d_out=normal(1.0, b, h, n, c, dv),
      d_final_state=normal(1.0, b, h, dk, dv),
  )


def forward_args(x: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
  return x["q"], x["k"], x["w"], x["u"], x["intra"], x["decay"], x["h0"]


@functools.cache
def case(shape: tuple[int, ...], dtype: str) -> tuple[dict[str, jax.Array], ForwardResult]:
  """Inputs and reference forward of one case, shared by its forward and backward tests (compiles are slow)."""
  inputs = random_inputs(sum(shape), shape, dtype)
  return inputs, inter_chunk_forward(*forward_args(inputs))


def backward_args(x: dict[str, jax.Array], fwd: ForwardResult) -> tuple[jax.Array, ...]:
  return x["q"], x["k"], x["w"], x["intra"], x["decay"], fwd.states, fwd.v_new, x["d_out"], x["d_final_state"]


def assert_close(ours, reference, tolerance: float) -> None:
  for name, a, b in zip(reference._fields, ours, reference):
    assert a.shape == b.shape and a.dtype == jnp.float32, (name, a.shape, a.dtype, b.shape)
    error = relative_error(a, b)
    assert error < tolerance, f"{name}: relative error {error:.2e} >= {tolerance:.0e}"


@pytest.mark.parametrize("shape,dtype", CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else c)
def test_forward_matches_reference(shape, dtype):
  inputs, reference = case(shape, dtype)
  assert_close(inter_chunk_forward_tpu(*forward_args(inputs), interpret=True), reference, TOLERANCE[dtype])


@pytest.mark.parametrize("shape,dtype", CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else c)
def test_backward_matches_reference(shape, dtype):
  args = backward_args(*case(shape, dtype))
  assert_close(inter_chunk_backward_tpu(*args, interpret=True), inter_chunk_backward(*args), TOLERANCE[dtype])


def test_forward_inside_shard_map():
  """Per-shard calls over a (batch, heads) mesh, as the model will make them.

  check_vma is off only because interpret mode gives the scratch state no varying axes (a dot then mixes
  varying and unvarying operands); the TPU compile in tpu_aot_check.py runs with check_vma on.
  """
  shape = (2, 4, 2, 16, 16, 16)
  args = forward_args(random_inputs(7, shape, "float32"))
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("batch", "heads"))
  spec = P("batch", "heads")
  kernel = lambda *a: tuple(inter_chunk_forward_tpu(*a, interpret=True))
  sharded = jax.jit(jax.shard_map(kernel, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec,
                                 check_vma=False))
  reference = inter_chunk_forward(*args)
  assert_close(reference._make(sharded(*args)), reference, 1e-5)


NO_LIBTPU = "libtpu is not installed (pip install 'jax[tpu]==<jax version>'): no deviceless TPU compile"


# A deviceless compile needs no chip, so several processes may load libtpu at once (libtpu's lockfile is for chips).
DEVICELESS_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "localhost",
                  "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason=NO_LIBTPU)
def test_compiles_for_tpu_topology_without_a_tpu():
  """Production shapes compile through Mosaic for v5p:2x2x1 inside jit(shard_map); prints the memory analysis.

  The third line compiles the public dispatcher's forward+backward on mesh-sharded model-layout inputs: its own
  shard_map must carry the Mosaic kernels (XLA cannot partition them), all four of them, with no XLA dot on
  [.., C, C] tiles and no triangular solve left (the chunk algebra is in the kernels)."""
  command = [sys.executable, "-m", "maxtext.kernels.gated_delta_rule.tpu_aot_check", "--topology", "v5p:2x2x1"]
  result = subprocess.run(command, env=DEVICELESS_ENV, capture_output=True, text=True, timeout=300)
  print(result.stdout)
  assert result.returncode == 0, result.stdout + result.stderr[-4000:]
  for kernel in ("forward", "backward"):
    assert f"{kernel}: compiled tpu_custom_call=True" in result.stdout, result.stdout
  dispatched = [line for line in result.stdout.splitlines() if line.startswith("dispatched fwd+bwd")]
  assert dispatched and "tpu_custom_call=True" in dispatched[0], result.stdout
  kernels = "gdr_inter_chunk_bwd,gdr_inter_chunk_fwd,gdr_intra_chunk_bwd,gdr_intra_chunk_fwd"
  assert f"pallas_kernels={kernels} chunk_algebra_xla_ops=0" in dispatched[0], dispatched[0]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason=NO_LIBTPU)
def test_gdn_layer_chunk_algebra_is_pallas_only_on_tpu():
  """The GDN layer's forward+backward compiled for v5p:2x2x1 (benchmarks/gated_delta_rule_tpu_cost.py, production
  chunk and head sizes, fewer heads and tokens for CI time): with impl 'tpu' it calls the four Pallas kernels and
  no XLA instruction of the chunk algebra is left; with 'tpu_jnp_algebra' (the earlier form) the same detector
  finds them. Fewer bytes accessed after than before, by XLA's cost analysis (the op's row and the layer's)."""
  command = [sys.executable, os.path.join(ROOT, "benchmarks", "gated_delta_rule_tpu_cost.py"),
             "--shape", "2,512,4,8,128,128", "--embed", "256"]
  result = subprocess.run(command, env=DEVICELESS_ENV, capture_output=True, text=True, timeout=300)
  print(result.stdout)
  assert result.returncode == 0, result.stdout + result.stderr[-4000:]
  rows = {}
  for line in result.stdout.splitlines():
    cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
    if len(cells) == 8:
      rows[cells[0], cells[1]] = cells
  all_kernels = {"gdr_intra_chunk_fwd", "gdr_intra_chunk_bwd", "gdr_inter_chunk_fwd", "gdr_inter_chunk_bwd"}
  for what in ("op", "GDN layer"):
    after, before = rows[what, "tpu"], rows[what, "tpu_jnp_algebra"]
    assert set(after[2].split()) == all_kernels and after[3] == "0", after
    assert "gdr_intra_chunk_fwd" not in before[2] and int(before[3]) > 0, before
    assert float(after[5].split()[0]) < float(before[5].split()[0]), (after, before)  # bytes accessed
