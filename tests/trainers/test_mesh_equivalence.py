"""The whole tiny model's train step on an 8-device forced-host mesh gives the single-device losses, gradient norms
and parameters, for fsdp x expert x tensor = 2 x 2 x 2.

Runs in a subprocess: XLA_FLAGS must be set before jax is imported (the test session has 4 devices), and a hang must
end as a clear failure, never a stuck CI job.

Why no LAPACK call may be in the step: XLA:CPU runs `jax.scipy.linalg.solve_triangular` as jaxlib's LAPACK trsm
FFI call, which for a batch big enough splits the batch into tasks on the intra-op thread pool and blocks its own
thread until they finish (jaxlib/cpu/lapack_kernels.cc, ParallelBatchMap). With several forced host devices every
device's program hands its ready thunks to that one pool; when all of the pool's threads sit in such a wait, the
tasks they queued never run and the step hangs forever (seen with gdb: every tf_XLAEigen thread in
BlockingCounter::Wait under lapack_strsm_ffi; any mesh of 2+ devices, data-only included). The gated delta rule's
chunk system is therefore solved by blocked doubling (matmuls only) in the jnp reference, the default CPU kernel,
which this test runs (the Pallas kernels' shard_map on 8 host devices: tests/kernels/test_gated_delta_rule_sharded.py).

The backend optimisation flags only make XLA:CPU compile ~3x faster; both runs use them.
"""

import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
XLA_FLAGS = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
             " --xla_llvm_disable_expensive_passes=true")
STEPS = 3
# (name, ici parallelism) of the 8-device meshes compared with one device.
MESHES = (("fsdp2_expert2_tensor2", {"fsdp": 2, "expert": 2, "tensor": 2}),)  # data8 also matched (~20 s more)
TINY = {
    "dtype": "float32", "base_num_decoder_layers": 4, "mtp_num_layers": 0, "max_target_length": 16,
    "remat_policy": "none", "scan_layers": True, "gdn_chunk_size": 16,
    # No warmup: the first update already moves the parameters, so steps 2 and 3 see updated weights.
    "learning_rate": 1e-2, "warmup_steps_fraction": 0.0, "steps": 10,
    # Adam divides each gradient by its own size: with eps 1e-8 a gradient that is only rounding noise (1e-10)
    # would move its parameter by +-lr at the noise's whim. eps 1e-3 keeps such updates proportional to the
    # gradient, so the parameters after the steps measure the gradients' agreement.
    "adam_eps": 1e-3,
}
GLOBAL_BATCH = 8
# float32 (eps 1.2e-7): a mesh only reorders sums (per-shard partial sums, all-reduces of the gradients), which
# moves a loss near 6.3 by a few ulps per reduction level (seen: <= 3e-7 on the losses, <= 5e-6 on the gradient
# norms of steps 2-3). 2e-5 relative leaves room for that and none for a wrong layout, which shows up at >= 1e-3
# (a dropped shard, a doubled all-reduce, a token routed twice).
RTOL = 2e-5
# Parameters after the steps, max |difference| over max |value| per tensor: Adam's first update lr * g / (|g| + eps)
# has a slope up to lr / eps = 10 in g, so the rounding noise of a gradient reaches the parameters amplified (seen:
# <= 1.4e-5). A wrong gradient moves a parameter by ~lr = 1e-2, against a largest value >= 0.02: >= 1e-1 (1e-2 for norm scales).
PARAMS_RTOL = 1e-4


def _training(mesh_axes: dict[str, int]):
  import jax

  from maxtext.configs import load_config
  from maxtext.trainers import train_step
  from maxtext.trainers.mesh import make_training_mesh

  devices = int(np.prod(list(mesh_axes.values())))
  parallelism = {f"ici_{axis}_parallelism": mesh_axes.get(axis, 1) for axis in ("data", "fsdp", "tensor", "expert")}
  config = load_config(overrides={**TINY, **parallelism, "per_device_batch_size": GLOBAL_BATCH / devices})
  training = train_step.build_training(config, make_training_mesh(config, jax.devices()[:devices]))
  assert training.global_batch_size == GLOBAL_BATCH
  return config, training


def _batch(vocab_size: int, length: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab_size, (GLOBAL_BATCH, length + 1))
  segments = np.ones((GLOBAL_BATCH, length), np.int32)
  segments[::2, length // 2:] = 2  # packed rows: two documents in every other row
  positions = np.where(segments == 1, np.arange(length), np.arange(length) - length // 2)
  mask = np.ones((GLOBAL_BATCH, length), np.float32)
  mask[1, -3:] = 0.0  # padding
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions, "segment_ids": segments,
          "loss_mask": mask}


def _run(training, params, batch):
  """STEPS train steps from `params` -> (per-step metrics, final params as numpy)."""
  import jax

  from maxtext.trainers.mesh import host_batch_to_global
  from maxtext.trainers.train_step import place_params

  state = training.state_from_params(place_params(params, training))
  global_batch = host_batch_to_global(batch, training.mesh)
  compiled = training.train_step.lower(state, global_batch).compile().as_text()
  assert "lapack" not in compiled, "a LAPACK call is in the step (see the module docstring)"
  history = []
  for _ in range(STEPS):
    state, metrics = training.train_step(state, global_batch)
    history.append({k: float(v) for k, v in metrics.items()})
  return history, jax.tree.map(np.asarray, state["params"]), compiled


def run_cases() -> None:
  import jax

  assert jax.device_count() == 8, jax.devices()
  config, single = _training({"data": 1})
  params = jax.tree.map(np.asarray, single.init_state(jax.random.key(0))["params"])
  batch = _batch(config.vocab_size, config.max_target_length)
  expected, expected_params, _ = _run(single, params, batch)
  print("one device:", [round(m["loss"], 6) for m in expected], flush=True)
  assert expected[-1]["loss"] < expected[0]["loss"] - 0.05, "the steps must move the parameters to be a test"

  for name, axes in MESHES:
    _, training = _training(axes)
    history, final_params, compiled = _run(training, params, batch)
    if "expert" in axes:
      assert "all-to-all" in compiled, f"{name}: the MoE layer did not run expert-parallel"
    if "tensor" in axes or "fsdp" in axes:
      assert "all-gather" in compiled or "reduce-scatter" in compiled, f"{name}: no sharded parameters"
    errors = {}
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
      got, want = np.array([m[key] for m in history]), np.array([m[key] for m in expected])
      errors[key] = float(np.max(np.abs(got - want) / np.abs(want)))
    leaves = zip(jax.tree.leaves(final_params), jax.tree.leaves(expected_params))
    errors["params"] = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30)) for a, b in leaves)
    print(f"{name}:", [round(m["loss"], 6) for m in history],
          " ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)
    metrics_error = max(v for k, v in errors.items() if k != "params")
    assert metrics_error < RTOL and errors["params"] < PARAMS_RTOL, (name, errors)
    print(f"OK {name}", flush=True)


def test_eight_device_meshes_match_one_device():
  env = {**os.environ, "XLA_FLAGS": XLA_FLAGS, "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, "-c", "from tests.trainers.test_mesh_equivalence import run_cases; run_cases()"]
  try:
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
  except subprocess.TimeoutExpired as e:
    raise AssertionError(f"the 8-device train steps did not finish in {e.timeout} s (hung?); output so far:\n"
                         f"{(e.stdout or b'').decode()[-3000:]}\n{(e.stderr or b'').decode()[-3000:]}") from None
  print(result.stdout)
  assert result.returncode == 0, result.stdout + result.stderr[-4000:]
  assert result.stdout.count("OK ") == len(MESHES), result.stdout
