"""Context parallelism on 8 forced host devices: the tiny model's train step with each sequence split over 2, 4 and
8 devices gives the losses and gradients of one device; so do the gated delta rule and attention ops alone
(tests/kernels/context_parallel_check.py). Packed documents cross shard boundaries (one starts exactly on one), and
the length (40) is no multiple of chunk x shards (16 x 2). per_device_batch_size is fractional (2 rows on 8 devices:
0.25).

Both run in subprocesses: XLA_FLAGS must be set before jax is imported (the test session has 4 devices).
"""

import concurrent.futures
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
XLA_FLAGS = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
             " --xla_llvm_disable_expensive_passes=true")
STEPS = 3
CONTEXTS = (2, 4, 8)
GLOBAL_BATCH = 2
LENGTH = 40
TINY = {
    "dtype": "float32", "base_num_decoder_layers": 4, "mtp_num_layers": 0, "max_target_length": LENGTH,
    "remat_policy": "none", "scan_layers": True, "gdn_chunk_size": 16, "ici_fsdp_parallelism": 1,
    "learning_rate": 1e-2, "warmup_steps_fraction": 0.0, "steps": 10, "adam_eps": 1e-3,
}
# float32: a split sequence only reorders sums (the state prefix, the gathered keys' reductions, the gradients'
# reduce-scatters). Seen: losses <= 3e-7, gradients <= 2e-7 relative. A wrong halo, a state carried into a new
# document or a mis-offset causal mask shows up at >= 1e-3.
RTOL = 1e-5


def _training(context: int):
  import jax

  from maxtext.configs import load_config
  from maxtext.trainers import train_step
  from maxtext.trainers.mesh import make_training_mesh

  overrides = {**TINY, "ici_context_parallelism": context, "per_device_batch_size": GLOBAL_BATCH / context}
  config = load_config(overrides=overrides)
  training = train_step.build_training(config, make_training_mesh(config, jax.devices()[:context]))
  assert training.global_batch_size == GLOBAL_BATCH
  return config, training


def _batch(vocab_size: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab_size, (GLOBAL_BATCH, LENGTH + 1))
  segments = np.ones((GLOBAL_BATCH, LENGTH), np.int32)
  segments[0, 7:] = 2  # starts inside a shard
  segments[0, LENGTH // 2:] = 3  # starts on a shard boundary for 2, 4 and 8 shards
  segments[1] = 1 + np.arange(LENGTH) // 9  # crosses boundaries
  starts = np.concatenate([np.ones((GLOBAL_BATCH, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
  index = np.arange(LENGTH)
  positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  mask = np.ones((GLOBAL_BATCH, LENGTH), np.float32)
  mask[1, -3:] = 0.0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions, "segment_ids": segments,
          "loss_mask": mask}


def _first_moments(opt_state) -> list[np.ndarray]:
  """Adam's first moments, (1 - b1) x the gradient after the first step: the step's own gradients, read back."""
  import jax

  leaves = jax.tree_util.tree_leaves_with_path(opt_state)
  return [np.asarray(x) for path, x in leaves if ".mu" in jax.tree_util.keystr(path)]


def _run(training, params, batch):
  """STEPS train steps from `params` -> (losses, the first step's gradients as flat leaves)."""
  from maxtext.trainers.mesh import host_batch_to_global
  from maxtext.trainers.train_step import place_params

  state = training.state_from_params(place_params(params, training))
  global_batch = host_batch_to_global(batch, training.mesh)
  losses, grads = [], None
  for _ in range(STEPS):
    state, metrics = training.train_step(state, global_batch)
    losses.append(float(metrics["loss"]))
    grads = grads or _first_moments(state["opt_state"])
  return losses, grads


def run_cases() -> None:
  import jax

  assert jax.device_count() == 8, jax.devices()
  config, single = _training(1)
  params = jax.tree.map(np.asarray, single.init_state(jax.random.key(0))["params"])
  batch = _batch(config.vocab_size)
  expected, expected_grads = _run(single, params, batch)
  print("context 1:", [round(x, 6) for x in expected], flush=True)
  assert expected[-1] < expected[0] - 0.05, "the steps must move the parameters to be a test"
  for context in CONTEXTS:
    _, training = _training(context)
    losses, grads = _run(training, params, batch)
    loss_err = float(np.max(np.abs(np.array(losses) - expected) / np.abs(expected)))
    flat = np.concatenate([g.ravel() for g in grads])
    flat_expected = np.concatenate([g.ravel() for g in expected_grads])
    grad_err = float(np.linalg.norm(flat - flat_expected) / np.linalg.norm(flat_expected))
    leaf_err = max(float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(grads, expected_grads))
    print(f"context {context}: losses {[round(x, 6) for x in losses]} loss_rel_err {loss_err:.1e}"
          f" grad_rel_err {grad_err:.1e} worst_leaf_grad_rel_err {leaf_err:.1e}", flush=True)
    assert loss_err < RTOL and grad_err < RTOL, (context, loss_err, grad_err)
    print(f"OK context {context}", flush=True)


def _subprocess(command: list[str], timeout: int) -> tuple[bool, str]:
  """(whether the command succeeded, its output, or what went wrong)."""
  env = {**os.environ, "XLA_FLAGS": XLA_FLAGS, "JAX_PLATFORMS": "cpu"}
  try:
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    return False, (f"did not finish in {e.timeout} s (hung?); output so far:\n"
                   f"{(e.stdout or b'').decode()[-3000:]}\n{(e.stderr or b'').decode()[-3000:]}")
  if result.returncode:
    return False, result.stdout + result.stderr[-4000:]
  return True, result.stdout


OP_CASES = [f"{op}:context{c}:reference" for op in ("gdn", "attention") for c in CONTEXTS] + [
    "gdn:data2_context2_tensor2:xla",  # the hand-written backward (d final state) under a mixed mesh
    "gdn:context2:tpu",  # the Pallas kernels (interpreted)
    "attention:data2_context2_tensor2:tpu",  # splash with its block mask split over the context axis
]
COMMANDS = {
    "train step": [sys.executable, "-c", "from tests.trainers.test_context_parallel import run_cases; run_cases()"],
    "ops": [sys.executable, "-m", "tests.kernels.context_parallel_check", *OP_CASES],
}


@pytest.fixture(scope="module")
def outputs() -> dict[str, tuple[bool, str]]:
  """Both subprocesses at once: each keeps about one of the CPU's two cores busy."""
  with concurrent.futures.ThreadPoolExecutor(len(COMMANDS)) as pool:
    return dict(zip(COMMANDS, pool.map(lambda command: _subprocess(command, timeout=300), COMMANDS.values())))


def test_train_step_with_context_parallelism_matches_one_device(outputs):
  ok, out = outputs["train step"]
  print(out)
  assert ok, out
  assert out.count("OK context") == len(CONTEXTS), out


def test_ops_with_context_parallelism_match_one_device(outputs):
  ok, out = outputs["ops"]
  print(out)
  assert ok, out
  for case in OP_CASES:
    op, name, impl = case.split(":")
    line = re.search(rf"^{op} {name} {impl}: all_gather=(\w+) loss_rel_err=(\S+) grad_rel_err=(\S+)$", out, re.M)
    assert line, (case, out)
    assert line.group(1) == "True", line.group(0)
    assert float(line.group(2)) < RTOL and float(line.group(3)) < RTOL, line.group(0)


# ------------------------------------------------------------------ bad input: one line each (in this session)


def test_context_parallelism_must_divide_the_sequence_length():
  import pytest

  from maxtext.configs import ConfigError, load_config

  with pytest.raises(ConfigError, match=r"context parallelism 6 \(ici_context_parallelism 3 x dcn_context_parallelism"
                                        r" 2\) must divide 'max_target_length' \(16\)"):
    load_config(overrides={"ici_context_parallelism": 3, "dcn_context_parallelism": 2, "max_target_length": 16})


def test_ops_refuse_a_sequence_the_context_axis_does_not_split():
  import jax
  import jax.numpy as jnp
  import pytest

  from maxtext import sharding
  from maxtext.kernels.attention import dot_product_attention
  from maxtext.kernels.gated_delta_rule import chunk_gated_delta_rule

  if jax.device_count() < 4:
    pytest.skip("needs 4 host devices (conftest)")
  mesh = sharding.make_mesh({"context": 4}, jax.devices()[:4])
  x = jnp.ones((1, 6, 2, 8), jnp.float32)
  gate = jnp.full((1, 6, 2), 0.5, jnp.float32)
  culprit = "the sequence length 6 does not split over the 4 devices of the mesh's context axis"
  with sharding.activate(mesh):
    with pytest.raises(ValueError, match=f"context-parallel gated delta rule: {culprit}"):
      chunk_gated_delta_rule(x, x, x, -gate, gate)
    with pytest.raises(ValueError, match=f"context-parallel attention: {culprit}"):
      dot_product_attention(x, x, x, scale=1.0)


def test_decoding_refuses_context_parallelism():
  import pytest

  from maxtext.configs import ConfigError, load_config
  from maxtext.inference.engine import Engine

  config = load_config(overrides={"ici_context_parallelism": 2, "dcn_context_parallelism": 1})
  with pytest.raises(ConfigError, match="context parallelism splits training sequences only"):
    Engine(config)
