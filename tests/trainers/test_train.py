"""The trainer end to end on a CPU: the tiny model learns the shipped corpus, a killed run resumes to the same
losses, finetuning starts from a trained checkpoint, and bad input stops with one line."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from maxtext.assets.data.build_tiny_tokenizer import DATA_DIR, TINY_TOKENIZER_DIR
from maxtext.checkpoint_conversion.safetensors_io import CheckpointFormatError
from maxtext.configs import load_config
from maxtext.trainers.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_TRAINING = {
    "dataset_type": "grain", "grain_train_files": os.path.join(DATA_DIR, "corpus.jsonl"),
    "tokenizer_path": TINY_TOKENIZER_DIR, "base_num_decoder_layers": 4, "mtp_num_layers": 0,
    "max_target_length": 64, "max_prefill_predict_length": 16, "per_device_batch_size": 4, "dtype": "float32",
    "remat_policy": "none", "steps": 100, "learning_rate": 3e-3, "warmup_steps_fraction": 0.05,
    "checkpoint_period": 40, "log_period": 10,
}
ONE_DEVICE = jax.devices()[:1]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """Runs of one config compile once: the persistent cache serves the later runs (another output directory)."""
  before = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield
  for key, value in before.items():
    jax.config.update(key, value)


def training_config(output, **overrides):
  return load_config(overrides={**TINY_TRAINING, "base_output_directory": str(output), **overrides})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, compile_cache):
  output = tmp_path_factory.mktemp("train")
  history = train(training_config(output, run_name="full"), devices=ONE_DEVICE)
  return output, history


def test_tiny_model_learns_the_shipped_corpus(uninterrupted):
  output, history = uninterrupted
  losses = np.array([m["loss"] for m in history])
  assert [m["step"] for m in history] == list(range(1, 101))
  assert abs(losses[0] - np.log(512)) < 0.3  # a fresh model is uniform over the vocabulary
  assert losses[-10:].mean() < losses[0] - 2.5, losses[::10]  # 6.26 -> 3.3 seen
  assert all(np.isfinite(m["grad_norm"]) and m["tokens_per_s"] > 0 for m in history)
  assert sorted(os.listdir(output / "full" / "checkpoints")) == ["100", "40", "80"]
  assert os.listdir(output / "full" / "tensorboard")[0].startswith("events.out.tfevents")


def test_killed_run_resumes_to_the_uninterrupted_losses(uninterrupted, tmp_path):
  _, full = uninterrupted
  config = training_config(tmp_path, run_name="killed")
  first = train(config, devices=ONE_DEVICE, stop_after=55)  # dies after step 55; the last checkpoint is step 40
  assert sorted(os.listdir(tmp_path / "killed" / "checkpoints")) == ["40"]
  resumed = train(config, devices=ONE_DEVICE)
  assert [m["step"] for m in resumed] == list(range(41, 101))
  expected = [m["loss"] for m in full]
  np.testing.assert_array_equal([m["loss"] for m in first], expected[:55])
  np.testing.assert_array_equal([m["loss"] for m in resumed], expected[40:])


def test_finetuning_starts_from_the_trained_parameters(uninterrupted, tmp_path):
  output, full = uninterrupted
  items = output / "full" / "checkpoints" / "100" / "items"
  config = training_config(tmp_path, run_name="finetune", load_parameters_path=str(items), steps=2,
                           enable_checkpointing=False)
  history = train(config, devices=ONE_DEVICE)
  assert history[0]["loss"] < full[0]["loss"] - 2.0  # trained, not fresh
  # a new run: a fresh schedule (2 steps, no warmup: the peak), not the trained run's decayed rate at step 100
  assert history[0]["learning_rate"] == pytest.approx(3e-3) and full[-1]["learning_rate"] < 1e-3


def test_resuming_a_checkpoint_of_another_model_stops_with_one_line(uninterrupted):
  output, _ = uninterrupted
  config = training_config(output, run_name="full", base_emb_dim=32, steps=101)
  with pytest.raises(CheckpointFormatError, match="cannot resume from .*full/checkpoints/100'") as error:
    train(config, devices=ONE_DEVICE)
  assert "\n" not in str(error.value)


def run_cli(*args, devices=1):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, "-m", "maxtext.trainers.pre_train.train", "src/maxtext/configs/base.yml", *args]
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, devices, message",
    [
        (("per_device_batch_size=0.25",), 4,
         "error: the global batch (1 = per_device_batch_size 0.25 x 4 devices) does not divide over the 4"),
        (("dataset_type=grain", "grain_train_files=/nonexistent/train-*.jsonl"), 1,
         "error: config key 'grain_train_files': no file matches '/nonexistent/train-*.jsonl'"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, args, devices, message):
  result = run_cli(f"base_output_directory={tmp_path}", "run_name=bad", *args, devices=devices)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "bad")
