"""The training loop: mesh -> state (resumed, loaded or fresh) -> batches -> steps -> metrics and checkpoints."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import jax

from maxtext.configs import Config, ConfigError
from maxtext.input_pipeline import make_train_iterator
from maxtext.trainers import flops, host_data
from maxtext.trainers import mesh as train_mesh
from maxtext.trainers.checkpointing import TrainCheckpointer
from maxtext.trainers.metrics import MetricsWriter, step_metrics
from maxtext.trainers.train_step import Training, build_training, place_params

_logger = logging.getLogger("maxtext.trainers")


def output_directory(config: Config) -> str:
  """<base_output_directory>/<run_name>: where checkpoints and TensorBoard logs of the run live."""
  if not config.base_output_directory and (config.enable_checkpointing or config.enable_tensorboard):
    raise ConfigError(
        "training writes checkpoints and TensorBoard logs: set base_output_directory (or enable_checkpointing=false"
        " enable_tensorboard=false)"
    )
  run_name = config.run_name or time.strftime("run_%Y%m%d_%H%M%S")
  return os.path.join(config.base_output_directory, run_name)


def _initial_state(config: Config, training: Training, checkpointer, iterator) -> tuple[Any, int]:
  """(state, its step): the run's latest checkpoint if there is one, else load_parameters_path, else fresh."""
  resumed = checkpointer.restore_latest(training.abstract_state, iterator) if checkpointer else None
  if resumed is not None:
    _logger.info("resumed from step %d of %s", resumed[1], checkpointer.directory)
    return resumed
  if config.load_parameters_path:
    from maxtext.checkpoint_conversion import orbax_io  # noqa: PLC0415

    _logger.info("loading parameters from %s", config.load_parameters_path)
    params = orbax_io.load_params(config.load_parameters_path, training.spec)
    return training.state_from_params(place_params(params, training)), 0
  return training.init_state(jax.random.key(config.init_weights_seed)), 0


def train(
    config: Config, *, devices: Sequence[jax.Device] | None = None, stop_after: int | None = None
) -> list[dict[str, float]]:
  """Train to `config.steps` on `devices` (default: all); returns the metrics of each step run here. `stop_after`
  ends the loop after that step without the final save, as a killed run would (for tests)."""
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax narrates every save at INFO
  run_dir = output_directory(config)
  mesh = train_mesh.make_training_mesh(config, devices)
  training = build_training(config, mesh)
  # Each process reads only the rows its devices hold (host_data.py); on one process, the whole batch.
  share = host_data.process_share(mesh, training.global_batch_size, config.max_target_length, config.data_shards)
  iterator = make_train_iterator(config, training.global_batch_size, share)
  checkpointer = TrainCheckpointer(os.path.join(run_dir, "checkpoints"), config) if config.enable_checkpointing else None
  writer = MetricsWriter(os.path.join(run_dir, "tensorboard") if config.enable_tensorboard else "", config.log_period)
  num_devices = mesh.devices.size
  flops_per_token = flops.training_flops_per_token(config)
  peak = flops.peak_tflops(jax.devices()[0].device_kind)
  history: list[dict[str, float]] = []
  try:
    state, start = _initial_state(config, training, checkpointer, iterator)
    num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    _logger.info(
        "model %s: %s parameters; mesh %s on %d %s device(s); global batch %d x %d tokens; %.3g training FLOPs/token",
        config.model_name, f"{num_params:,}", dict(mesh.shape), num_devices, jax.default_backend(),
        training.global_batch_size, config.max_target_length, flops_per_token,
    )
    if start >= config.steps:
      _logger.info("the run is already at step %d of steps=%d: nothing to do", start, config.steps)
      return history
    _logger.info("training steps %d..%d (the first step compiles)", start + 1, config.steps)
    tokens_per_batch = training.global_batch_size * config.max_target_length
    for step in range(start + 1, config.steps + 1):
      began = time.perf_counter()
      batch = host_data.to_global(next(iterator), mesh, share)
      state, raw = training.train_step(state, batch)
      raw = jax.device_get(raw)  # waits for the step: the time below is the step's, data loading included
      metrics = step_metrics(raw, time.perf_counter() - began, tokens_per_batch, flops_per_token, num_devices, peak)
      metrics["step"] = step
      history.append(metrics)
      writer.write(step, config.steps, metrics, print_line=step % config.log_period == 0 or step == config.steps)
      if checkpointer:
        checkpointer.maybe_save(step, state, iterator, force=step == config.steps)
      if stop_after is not None and step == stop_after:
        return history
    _summarise(history)
    return history
  finally:
    if checkpointer:
      checkpointer.close()
    writer.close()


def _summarise(history: list[dict[str, float]]) -> None:
  timed = history[1:] or history  # the first step includes compilation
  mean = lambda key: sum(m[key] for m in timed) / len(timed)
  line = f"done: final loss {history[-1]['loss']:.4f}; mean over steps after the first: {mean('tokens_per_s'):,.0f}"
  line += f" tokens/s, {mean('tflops_per_device'):.2f} TFLOP/s per device"
  if "mfu" in timed[0]:
    line += f", MFU {100 * mean('mfu'):.1f}%"
  _logger.info(line)
