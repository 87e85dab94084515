"""RL end to end on a CPU: the tiny model learns the toy copy task through the CLI with GRPO and with GSPO (float32
everywhere: the first update's ratio is exactly 1; with rl_replay_logprobs the trainer's log-probs equal the
engine's bit for bit, with plain and with MTP-speculative sampled rollouts, and without it the packed forward's
match them to float32 rounding); in bf16 the mismatch is small and reported."""

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys

import jax
import pytest

from maxtext.configs import load_config
from maxtext.trainers.post_train.rl.loop import rl_train
from tests.trainers.post_train.toy_task import TOY_MODEL, build_task

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# Constant learning rate, no weight decay: the run is short and the policy should keep what it learnt.
# 10 prompts x 16 responses of up to 2 tokens per step; cosine decay to 0.1 keeps the late steps from undoing what
# was learnt. The schedule's length is fixed so that the one-step runs below compile the same programs (persistent
# cache). Seen on a CPU: reward 0.04 at step 1, 0.93 (grpo) and 0.93 (gspo) over steps 56-60.
LEARNING = {"learning_rate": 4e-3, "warmup_steps_fraction": 0.0, "cosine_learning_rate_final_fraction": 0.1,
            "learning_rate_schedule_steps": 60, "adam_weight_decay": 0.0, "max_response_length": 2,
            "num_generations": 16, "rollout_batch_size": 10, "rl_eval_num_samples": 8, "steps": 60, "log_period": 1}
RECIPES = {
    "grpo": {"rl_algorithm": "grpo", "eps_clip": 0.2, "eps_clip_high": 0.28, "rl_loss_aggregation": "token_mean"},
    "gspo": {"rl_algorithm": "gspo", "eps_clip": 4e-4, "eps_clip_high": 4e-4, "rl_loss_aggregation": "sequence_mean"},
}
# The GRPO run replays the log-probs in the engine's arithmetic (exactly the rollout's); GSPO trains on the packed
# forward's (the default), so both paths learn and both are checked.
REPLAY = {"grpo": True, "gspo": False}
_REWARD = re.compile(r"^rl step .*? (\d+)/\d+ \| reward ([0-9.]+)±")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  return build_task(str(tmp_path_factory.mktemp("toy")))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """One persistent compilation cache for the CLI runs and the in-process runs of this module."""
  directory = str(tmp_path_factory.mktemp("jax_cache"))
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  before = {k: getattr(jax.config, k) for k in keys}
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield directory
  for key, value in before.items():
    jax.config.update(key, value)


def run_cli(task, output, cache_dir, **overrides) -> subprocess.CompletedProcess:
  values = {**TOY_MODEL, **task, **LEARNING, "base_output_directory": str(output), "run_name": "run", **overrides}
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "JAX_COMPILATION_CACHE_DIR": cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONPATH": REPO}
  command = [sys.executable, "-m", "maxtext.trainers.post_train.rl", "src/maxtext/configs/base.yml",
             *(f"{k}={v}" for k, v in values.items())]
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


# The module's CLI runs, by name, in the order they start: the two learning runs and the speculative-sampling run
# (3 steps). The speculative run (an MTP model) shares no program with the others, so it runs beside GRPO while
# GSPO waits and then finds GRPO's rollout programs in the persistent cache.
CLI_RUNS = {
    "grpo": {**RECIPES["grpo"], "rl_replay_logprobs": str(REPLAY["grpo"]).lower()},
    "speculative": {**RECIPES["grpo"], "mtp_num_layers": 1, "mtp_speculative_decoding": "true",
                    "mtp_num_draft_tokens": 2, "rl_temperature": 1, "max_response_length": 4, "steps": 3,
                    "rl_eval_files": "", "rl_replay_logprobs": "true"},
    "gspo": {**RECIPES["gspo"], "rl_replay_logprobs": str(REPLAY["gspo"]).lower()},
}


@pytest.fixture(scope="module")
def cli_runs(task, cache_dir, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
  """Every CLI_RUNS entry's result, two processes at a time (the CPU has two cores and each run keeps about one
  busy)."""
  def one(name):
    return name, run_cli(task, tmp_path_factory.mktemp(name), cache_dir, **CLI_RUNS[name])

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    return dict(pool.map(one, CLI_RUNS))


@pytest.mark.parametrize("algorithm", sorted(RECIPES))
def test_tiny_model_learns_the_copy_task_through_the_cli(cli_runs, algorithm):
  replay = REPLAY[algorithm]
  result = cli_runs[algorithm]
  assert result.returncode == 0, result.stderr[-3000:]
  rewards = {int(m.group(1)): float(m.group(2)) for m in map(_REWARD.match, result.stdout.splitlines()) if m}
  assert sorted(rewards) == list(range(1, 61)), result.stdout[-2000:]
  last = [rewards[s] for s in range(56, 61)]
  assert rewards[1] < 0.2 and sum(last) / 5 > 0.8, rewards
  _assert_float32_consistent(result.stdout, replay)
  final_eval = float(re.search(r"eval pass@1 ([0-9.]+)", result.stdout.splitlines()[-1]).group(1))
  assert final_eval > 0.8, result.stdout[-500:]


def _assert_float32_consistent(stdout: str, replay: bool) -> None:
  """Float32 everywhere: on every step the first update's ratio is exactly 1. With replay the trainer's log-probs
  are the engine's own computation (prefill + recurrent decode steps, KV cache, at the rollout's shapes): the
  mismatch is exactly 0. The packed forward (chunked delta rule over packed rows), which the gradient flows through
  and which the default trains on, equals them to float32 rounding: the same logits through differently shaped
  and ordered sums (docs/rl.md), a few units in the last place of logits that grow as the policy sharpens. So the
  max is bounded relative to max(1, |log-prob|) of its token, not absolutely: seen over 60 steps (2026-12-02,
  the packages a fresh install took then): mean <= 1.7e-7, max 1.1e-5 at a log-prob of about -3.5, i.e. 3.1e-6
  relative (GRPO; 1.7e-6 absolute in an earlier environment), GSPO 4.4e-6 / 2.6e-6, k3 <= 3.5e-14; bf16 is ~1e-2."""
  lines = [line for line in stdout.splitlines() if line.startswith("rl step")]
  assert lines and all(" r-1 0.0e+00 " in line for line in lines), lines[:1]
  # (mean, max, max relative to max(1, |logp|)) of |log-prob difference|, and the mismatch's k3
  mismatch = [tuple(map(float, re.search(r"mismatch (\S+)/(\S+) \((\S+)\) k3", line).groups())) for line in lines]
  k3 = [float(re.search(r" k3 (\S+)", line).group(1)) for line in lines]
  gap = [tuple(map(float, m.groups())) for m in (re.search(r"packed-replay (\S+)/(\S+) \((\S+)\)", l) for l in lines)
         if m]
  if replay:
    assert all(m == (0.0, 0.0, 0.0) for m in mismatch) and not any(k3), (mismatch, k3)
    assert len(gap) == len(lines), lines[:1]
    packed = gap
  else:
    assert not gap, lines[:1]
    packed = mismatch
    assert max(abs(k) for k in k3) < 1e-12, k3
  assert max(m[0] for m in packed) < 3e-7 and max(m[2] for m in packed) < 1e-5, packed


def test_speculative_sampled_rollouts_through_the_cli(cli_runs):
  """mtp_speculative_decoding with rl_temperature=1: rollouts run speculative sampling with the MTP layer (the line
  reports the drafts' acceptance); replaying its rounds (the same compiled calls) gives their log-probs exactly."""
  result = cli_runs["speculative"]
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [line for line in result.stdout.splitlines() if line.startswith("rl step")]
  assert len(lines) == 3 and all("mtp drafts accepted" in line for line in lines), result.stdout[-2000:]
  _assert_float32_consistent(result.stdout, replay=True)


ONE_DEVICE = jax.devices()[:1]


def test_bfloat16_two_updates_with_kl_mismatch_reported_and_a_killed_run_resumes_exactly(task, cache_dir, tmp_path,
                                                                                         capsys):
  def config(run_name, **extra):
    return load_config(overrides={
        **TOY_MODEL, **task, **LEARNING, "dtype": "bfloat16", "steps": 2, "num_generations": 4,
        "rollout_batch_size": 4, "rl_global_batch_size": 8,  # two optimizer steps per rollout
        "kl_coef": 0.01, "kl_type": "k3",  # the reference policy's forward runs too
        "enable_checkpointing": True, "async_checkpointing": False, "checkpoint_period": 1,
        "base_output_directory": str(tmp_path), "run_name": run_name, **extra})

  full = rl_train(config("full"), devices=ONE_DEVICE)
  line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("rl step")][0]
  first = full[0]
  assert f"mismatch {first['mismatch_mean']:.2e}/{first['mismatch_max']:.2e}" in line
  assert 0 < first["mismatch_mean"] < 0.05 and first["mismatch_max"] < 0.5, first  # bf16: small, not 0
  assert first["first_ratio_deviation_max"] == 0.0
  # The second update compares with pi_old's log-probs taken before the first one: its ratio has moved off 1.
  assert first["optimizer_steps"] == 2 and first["ratio_deviation_max"] > 0
  # KL to the starting policy: 0 on the first update (the same parameters), > 0 on the second.
  assert first["kl"] > 0 and f"kl {first['kl']:.2e}" in line

  # A run killed after step 1 holds what the full run saved at step 1 (checkpoint_period=1, synchronous saves):
  # that step alone, copied, is what the resumed run finds.
  shutil.copytree(tmp_path / "full" / "checkpoints", tmp_path / "cut" / "checkpoints",
                  ignore=shutil.ignore_patterns("2"))
  [resumed] = rl_train(config("cut"), devices=ONE_DEVICE)
  assert resumed["step"] == 2
  for key in ("reward_mean", "response_length", "policy_loss", "grad_norm", "mismatch_mean", "learning_rate"):
    assert resumed[key] == full[1][key], key  # same prompts, samples, parameters and optimizer state
