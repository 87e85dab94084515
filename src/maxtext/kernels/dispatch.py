"""Choosing a kernel implementation per backend, and saying once which one ran."""

from __future__ import annotations

import logging

import jax

_logger = logging.getLogger("maxtext.kernels")
_announced: set[tuple[str, str]] = set()


def backend() -> str:
  """'tpu', 'gpu' or 'cpu': the platform the code is being traced for.

  That is the active mesh's device platform when a mesh is set (deviceless TPU compilation from a CPU host sets a
  mesh of TPU topology devices while the default backend stays 'cpu'), else the default device's.
  """
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  platform = device.platform if device is not None else jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def choose(op: str, impl: str, available: dict[str, tuple[str, ...]]) -> str:
  """Resolve `impl` ('auto' or a name) for `op` given the implementations available per backend.

  `available` maps a backend to its implementations, best first; 'reference' must run everywhere.
  """
  platform = backend()
  known = sorted({name for names in available.values() for name in names} | {"reference"})
  if impl == "auto":
    chosen = available.get(platform, ("reference",))[0]
  elif impl in known:
    chosen = impl
  else:
    raise ValueError(f"unknown {op} implementation '{impl}': choose one of auto, {', '.join(known)}")
  if (op, chosen) not in _announced:
    _announced.add((op, chosen))
    _logger.info("%s: using the '%s' implementation on %s", op, chosen, platform)
  return chosen
