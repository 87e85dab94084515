"""Keep jax from probing accelerators this machine does not have.

With libtpu installed (our test extras bring it, for deviceless TPU compilation) jax tries the TPU runtime on every
start and prints a screen of initialisation errors when there is no TPU. Command-line tools call
`default_platforms()` first: unless the user set JAX_PLATFORMS, it selects the CPU on a machine with no accelerator device.
"""

from __future__ import annotations

import glob
import os


def has_tpu_devices() -> bool:
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def default_platforms() -> None:
  """JAX_PLATFORMS=cpu when the user set none and the machine has neither a TPU nor an NVIDIA GPU."""
  if os.environ.get("JAX_PLATFORMS") or has_tpu_devices() or glob.glob("/dev/nvidia[0-9]*"):
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
