"""Per-step metrics: one compact console line with a progress bar, and TensorBoard scalars."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import jax

_logger = logging.getLogger("maxtext.trainers")


def memory_in_use_gib() -> tuple[float, float] | None:
  """(in use, peak) GiB on this host's first device, or None where the backend does not report it (CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - some backends raise instead of returning None
    return None
  if not stats or "bytes_in_use" not in stats:
    return None
  gib = 1024.0**3
  return stats["bytes_in_use"] / gib, stats.get("peak_bytes_in_use", stats["bytes_in_use"]) / gib


def step_metrics(
    raw: dict[str, Any], step_seconds: float, tokens: int, flops_per_token: float, num_devices: int, peak: float | None
) -> dict[str, float]:
  """Device metrics of a step (already on the host) plus throughput: tokens/s, TFLOP/s per device, MFU."""
  metrics = {key: float(value) for key, value in raw.items()}
  metrics["step_time_s"] = step_seconds
  metrics["tokens_per_s"] = tokens / step_seconds
  metrics["tflops_per_device"] = flops_per_token * tokens / step_seconds / num_devices / 1e12
  if peak:
    metrics["mfu"] = metrics["tflops_per_device"] / peak
  memory = memory_in_use_gib()
  if memory is not None:
    metrics["memory_gib"], metrics["peak_memory_gib"] = memory
  return metrics


def progress_bar(step: int, total: int, width: int = 20) -> str:
  filled = int(width * step / max(total, 1))
  return "[" + "#" * filled + "." * (width - filled) + f"] {step}/{total}"


def format_line(step: int, total: int, m: dict[str, float]) -> str:
  parts = [progress_bar(step, total), f"loss {m['loss']:.4f}"]
  if "mtp_loss" in m:
    parts.append(f"mtp {m['mtp_loss']:.3f}")
  parts += [
      f"aux {m['aux_loss']:.3f}",
      f"gnorm {m['grad_norm']:.3f}",
      f"lr {m['learning_rate']:.2e}",
      f"{m['tokens_per_s']:,.0f} tok/s",
      f"{m['tflops_per_device']:.3g} TFLOP/s/dev",
  ]
  if "mfu" in m:
    parts.append(f"MFU {100 * m['mfu']:.1f}%")
  parts.append(f"{m['step_time_s']:.3f}s")
  if "memory_gib" in m:
    parts.append(f"mem {m['memory_gib']:.1f}/{m['peak_memory_gib']:.1f} GiB")
  return "step " + " | ".join(parts)


class MetricsWriter:
  """Console lines (process 0) and TensorBoard event files under `tensorboard_dir` ('' disables them)."""

  def __init__(self, tensorboard_dir: str, flush_period: int):
    self._writer = None
    self._flush_period = flush_period
    if tensorboard_dir and jax.process_index() == 0:
      try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415
      except ImportError:
        _logger.warning("enable_tensorboard: tensorboardX is not installed (pip install tensorboardX); no event files")
      else:
        os.makedirs(tensorboard_dir, exist_ok=True)
        self._writer = SummaryWriter(tensorboard_dir, flush_secs=60)
        _logger.info("TensorBoard scalars in %s", tensorboard_dir)

  def write(self, step: int, total: int, metrics: dict[str, float], print_line: bool = True) -> None:
    if jax.process_index() != 0:
      return
    if print_line:
      print(format_line(step, total, metrics), file=sys.stdout, flush=True)
    if self._writer is not None:
      for key, value in metrics.items():
        self._writer.add_scalar(f"train/{key}", value, step)
      if step % self._flush_period == 0:
        self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
