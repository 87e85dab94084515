"""Checkpoints you can trust: a run SIGKILLed anywhere around a save leaves a newest visible step that loads and
resumes to the losses of an uninterrupted run; damage is one line naming the file; inference reads parameters
only; a damaged newest step is skipped on resume; a failed write stops the run with one line."""

from __future__ import annotations

import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from maxtext.assets.data.build_tiny_tokenizer import DATA_DIR, TINY_TOKENIZER_DIR
from maxtext.checkpoint_conversion import orbax_io
from maxtext.checkpoint_conversion.safetensors_io import CheckpointFormatError
from maxtext.configs import load_config
from maxtext.models.spec import ModelSpec
from maxtext.trainers.trainer import train
from tests.trainers.kill_during_save import NEVER, POINTS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL_RUN = {
    "dataset_type": "grain", "grain_train_files": os.path.join(DATA_DIR, "corpus.jsonl"),
    "tokenizer_path": TINY_TOKENIZER_DIR, "base_num_decoder_layers": 4, "mtp_num_layers": 0,
    "max_target_length": 32, "max_prefill_predict_length": 16, "per_device_batch_size": 2, "dtype": "float32",
    "remat_policy": "none", "steps": 6, "checkpoint_period": 2, "log_period": 1, "learning_rate": 3e-3,
    "enable_tensorboard": False,
}
ONE_DEVICE = jax.devices()[:1]
NOISE = ("Traceback", "RuntimeWarning", "Event loop is closed", "absl", "orbax")


def cli_args(output, **overrides) -> list[str]:
  values = {**SMALL_RUN, "base_output_directory": str(output), "run_name": "run", **overrides}
  return ["src/maxtext/configs/base.yml", *(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                           for k, v in values.items())]


def child_env(cache_dir, xla_flags="--xla_force_host_platform_device_count=1") -> dict[str, str]:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags,
          "JAX_COMPILATION_CACHE_DIR": str(cache_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def run_module(module: str, args: list[str], cache_dir, preexec_fn=None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=child_env(cache_dir),
                        capture_output=True, text=True, timeout=400, preexec_fn=preexec_fn)


def run_training_cli(point: str, step: int, args: list[str], cache_dir, preexec_fn=None) -> subprocess.CompletedProcess:
  """The training CLI through kill_during_save (killed at `point` of saving `step`, or `never`): on the first of
  this session's devices (its XLA_FLAGS), so the programs the in-process reference run compiled come from the
  persistent cache instead of being compiled again in each child."""
  return subprocess.run([sys.executable, "-m", "tests.trainers.kill_during_save", point, str(step), *args], cwd=REPO,
                        env=child_env(cache_dir, os.environ.get("XLA_FLAGS", "")), capture_output=True, text=True,
                        timeout=400, preexec_fn=preexec_fn)


def visible_steps(run_dir) -> list[int]:
  return sorted(int(name) for name in os.listdir(os.path.join(run_dir, "checkpoints")) if name.isdigit())


def stderr_lines(result) -> list[str]:
  # libtpu (installed for the deviceless TPU tests) prints its own probe lines when jax starts: not ours.
  ignored = ("WARNING: could not determine TPU", "Failed to find host bounds", "E0000 ", "=== Source Location",
             "learning/")
  return [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(ignored)]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("jax_cache")
  before = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield directory
  for key, value in before.items():
    jax.config.update(key, value)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
  """An uninterrupted run: its losses and checkpoints at steps 2, 4, 6."""
  output = tmp_path_factory.mktemp("reference")
  history = train(load_config(overrides={**SMALL_RUN, "base_output_directory": str(output), "run_name": "run"}),
                  devices=ONE_DEVICE)
  return os.path.join(output, "run"), [m["loss"] for m in history]


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory, cache_dir, reference):
  """Each kill point: the run SIGKILLed while saving step 4 (two at a time: the CPU has two cores)."""
  root = tmp_path_factory.mktemp("killed")

  def one(point):
    output = root / point
    result = run_training_cli(point, 4, cli_args(output), cache_dir)
    return point, (os.path.join(output, "run"), result)

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    return dict(pool.map(one, POINTS))


@pytest.mark.parametrize("point", POINTS)
def test_killed_save_leaves_a_step_that_loads_and_resumes(point, killed_runs, reference, cache_dir):
  run_dir, result = killed_runs[point]
  reference_dir, reference_losses = reference
  assert result.returncode == -9, result.stderr[-3000:]
  steps = visible_steps(run_dir)
  newest = 4 if point == "after_publish" else 2
  assert steps[-1] == newest, (steps, os.listdir(os.path.join(run_dir, "checkpoints")))
  for step in steps:  # no half step that looks valid
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", str(step), orbax_io.MODEL_CONFIG_FILE))
  # It loads as decode loads it, with the parameters the uninterrupted run saved at that step.
  config = load_config(overrides={"load_parameters_path": os.path.join(run_dir, "checkpoints", str(newest), "items")})
  loaded = orbax_io.restore_flat(config.load_parameters_path)
  saved = orbax_io.restore_flat(os.path.join(reference_dir, "checkpoints", str(newest), "items"))
  assert loaded.keys() == saved.keys()
  for path in saved:
    np.testing.assert_array_equal(loaded[path], saved[path], err_msg=path)
  orbax_io.load_params(config.load_parameters_path, ModelSpec.from_config(config))
  # It resumes to the uninterrupted run's losses.
  resumed = train(load_config(overrides={**SMALL_RUN, "base_output_directory": os.path.dirname(run_dir),
                                         "run_name": "run"}), devices=ONE_DEVICE)
  assert [m["step"] for m in resumed] == list(range(newest + 1, 7))
  np.testing.assert_array_equal([m["loss"] for m in resumed], reference_losses[newest:])


def damaged_copy(reference_dir, destination, step=6):
  shutil.copytree(os.path.join(reference_dir, "checkpoints", str(step)), destination)
  return os.path.join(destination, "items")


def first_chunk(items, array="params.decoder.blocks.layer_0.linear_attn.in_proj_ba.kernel"):
  return sorted(f for f in glob.glob(os.path.join(items, array, "*")) if not os.path.basename(f).startswith("."))[0]


def flip_a_bit(file):
  data = bytearray(open(file, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(file, "wb").write(data)


DAMAGE = {
    "array metadata deleted": (
        lambda items: os.remove(os.path.join(items, "params.decoder.blocks.layer_0.linear_attn.in_proj_ba.kernel",
                                             ".zarray")),
        "error: cannot open '{items}/params.decoder.blocks.layer_0.linear_attn.in_proj_ba.kernel' (missing or damaged"
        " metadata)"),
    "array deleted": (
        lambda items: shutil.rmtree(os.path.join(items, "params.norm.scale")),
        "error: '{items}/params.norm.scale' is missing: the checkpoint lacks"
        " parameter 'norm/scale'"),
    "truncated file": (
        lambda items: os.truncate(first_chunk(items), 10),
        "error: cannot read '{items}/params.decoder.blocks.layer_0.linear_attn.in_proj_ba.kernel' (truncated or"
        " corrupt file?)"),
    "flipped bit": (
        lambda items: flip_a_bit(first_chunk(items)),
        "error: '{items}/params.decoder.blocks.layer_0.linear_attn.in_proj_ba.kernel' does not match its checksum in"
        " the model record: the file is corrupt"),
    "model record missing": (
        lambda items: os.remove(os.path.join(os.path.dirname(items), orbax_io.MODEL_CONFIG_FILE)),
        "error: the checkpoint '{step}' has no model record (maxtext_model.json)"),
    "model record corrupt": (
        lambda items: open(os.path.join(os.path.dirname(items), orbax_io.MODEL_CONFIG_FILE), "w").write("{\"mod"),
        "error: '{step}/maxtext_model.json' is not a valid model record"),
    "path missing": (
        lambda items: shutil.rmtree(os.path.dirname(items)),
        "error: load_parameters_path '{items}' does not exist"),
    "not a checkpoint": (
        lambda items: shutil.rmtree(items),
        "error: load_parameters_path '{items}' is not a checkpoint step"),
}


DECODE = ["src/maxtext/configs/base.yml", f"tokenizer_path={TINY_TOKENIZER_DIR}", "prompt=the cat",
          "max_target_length=24", "per_device_batch_size=1"]


def _without_optimizer_state(items):
  optimizer = glob.glob(os.path.join(items, "opt_state.*"))
  assert optimizer
  for directory in optimizer:
    shutil.rmtree(directory)


# name -> (how to prepare a copy of the reference's step 6, the CLI module, its arguments after the config)
CLI_CASES = {
    **{f"damage: {case}": (damage, "maxtext.decode", DECODE[1:]) for case, (damage, _) in DAMAGE.items()},
    "model name": (lambda items: None, "maxtext.decode", ["model_name=qwen3-next-80b-a3b", "prompt=the cat"]),
    "server": (lambda items: flip_a_bit(first_chunk(items)), "maxtext.serving.server",
               [f"tokenizer_path={TINY_TOKENIZER_DIR}", "server_port=18431"]),
    "parameters only": (_without_optimizer_state, "maxtext.decode", [*DECODE[1:], "decode_stop_token_ids=none"]),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, reference, cache_dir):
  """Each CLI_CASES entry: (its checkpoint's items directory, the CLI's result), two processes at a time (the CPU
  has two cores; each waits mostly on its own start-up)."""
  root = tmp_path_factory.mktemp("cli")
  prepared = {}
  for i, (name, (prepare, module, args)) in enumerate(CLI_CASES.items()):
    items = damaged_copy(reference[0], root / str(i) / "6")
    prepare(items)
    prepared[name] = items, module, [DECODE[0], f"load_parameters_path={items}", *args]

  def one(name):
    items, module, args = prepared[name]
    return name, (items, run_module(module, args, cache_dir))

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    return dict(pool.map(one, CLI_CASES))


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_is_one_line_from_decode(case, cli_runs):
  message = DAMAGE[case][1]
  items, result = cli_runs[f"damage: {case}"]
  assert result.returncode != 0
  lines = stderr_lines(result)
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith(message.format(items=items, step=os.path.dirname(items))), lines[0]


def test_model_record_must_agree_with_model_name(cli_runs):
  items, result = cli_runs["model name"]
  assert result.returncode == 2
  lines = stderr_lines(result)
  assert len(lines) == 1 and lines[0].startswith(
      f"error: model_name=qwen3-next-80b-a3b does not match the checkpoint '{os.path.dirname(items)}'"), lines


def test_server_reports_a_damaged_checkpoint_in_one_line(cli_runs):
  _, result = cli_runs["server"]
  assert result.returncode == 1
  lines = stderr_lines(result)
  assert len(lines) == 1 and "does not match its checksum in the model record" in lines[0], result.stderr[-3000:]


def test_decode_reads_parameters_only(cli_runs, monkeypatch):
  """A training checkpoint without its optimizer state decodes; the reader opens parameter arrays only and reads
  about the parameters' bytes."""
  items, result = cli_runs["parameters only"]
  assert not glob.glob(os.path.join(items, "opt_state.*"))
  stored = sum(os.path.getsize(f) for f in glob.glob(os.path.join(items, "params.*", "*")))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "20 tokens in" in result.stderr

  import tensorstore  # noqa: PLC0415

  opened = []
  real_open = tensorstore.open
  monkeypatch.setattr(tensorstore, "open", lambda spec, *a, **k: opened.append(spec["kvstore"]["path"]) or
                      real_open(spec, *a, **k))
  read_before = _bytes_read()
  flat = orbax_io.restore_flat(items)
  read = _bytes_read() - read_before
  assert opened and all(os.path.basename(p.rstrip("/")).startswith("params.") for p in opened)
  assert len(opened) == len(flat)
  assert stored <= read < stored + 64 * 1024 * len(flat), (read, stored)  # the files plus their small metadata


def _bytes_read() -> int:
  with open("/proc/self/io", encoding="ascii") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def test_resume_skips_a_damaged_newest_step(reference, tmp_path, cache_dir):
  reference_dir, reference_losses = reference
  run_dir = tmp_path / "run"
  shutil.copytree(os.path.join(reference_dir, "checkpoints"), run_dir / "checkpoints",
                  ignore=shutil.ignore_patterns("2"))
  flip_a_bit(first_chunk(str(run_dir / "checkpoints" / "6" / "items"),
                         "opt_state.1.0.mu.decoder.blocks.layer_0.linear_attn.in_proj_ba.kernel"))
  resumed = train(load_config(overrides={**SMALL_RUN, "base_output_directory": str(tmp_path), "run_name": "run"}),
                  devices=ONE_DEVICE)
  assert [m["step"] for m in resumed] == [5, 6]
  np.testing.assert_array_equal([m["loss"] for m in resumed], reference_losses[4:6])
  names = sorted(os.listdir(run_dir / "checkpoints"))
  assert any(name.startswith("6.damaged-") for name in names) and "6" in names, names


def test_resume_refuses_a_checkpoint_of_another_model_and_touches_nothing(reference, tmp_path):
  shutil.copytree(os.path.join(reference[0], "checkpoints"), tmp_path / "run" / "checkpoints")
  config = load_config(overrides={**SMALL_RUN, "base_emb_dim": 32, "base_output_directory": str(tmp_path),
                                  "run_name": "run", "steps": 8})
  with pytest.raises(CheckpointFormatError, match="cannot resume from .*run/checkpoints/6': a checkpoint of another"):
    train(config, devices=ONE_DEVICE)
  assert visible_steps(tmp_path / "run") == [2, 4, 6]


def test_failed_write_stops_with_one_line_and_keeps_the_last_step(reference, tmp_path, cache_dir):
  import resource  # noqa: PLC0415

  shutil.copytree(os.path.join(reference[0], "checkpoints"), tmp_path / "run" / "checkpoints",
                  ignore=shutil.ignore_patterns("4", "6"))
  limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # a full disk, for files over 4 KiB
  result = run_training_cli(NEVER, 0, cli_args(tmp_path, steps=4), cache_dir, preexec_fn=limit)
  assert result.returncode == 1
  lines = stderr_lines(result)
  assert lines[-1].startswith(f"error: saving checkpoint step 4 under '{tmp_path}/run/checkpoints' failed: OSError:"
                              " [Errno 27] File too large"), result.stderr[-3000:]
  assert not any(noise in line for line in lines for noise in NOISE), result.stderr[-3000:]
  assert visible_steps(tmp_path / "run") == [2]
  loaded = orbax_io.restore_flat(str(tmp_path / "run" / "checkpoints" / "2" / "items"))
  saved = orbax_io.restore_flat(os.path.join(reference[0], "checkpoints", "2", "items"))
  for path in saved:
    np.testing.assert_array_equal(loaded[path], saved[path], err_msg=path)
