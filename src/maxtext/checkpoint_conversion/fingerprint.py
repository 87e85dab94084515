"""Checksums of stored arrays, computed from the values themselves (on device at save, on host at load).

A fingerprint is two sums over an array's raw words (each element's bits as an unsigned integer, 8 bytes split in
two), both modulo 2**32: sum(w) and sum(w * w). Any single flipped bit changes the first sum, a truncated file read
back as fill values changes either, and both sums are additive: a stacked array's fingerprint is the sum of its
slabs' (the converter writes slab by slab), and the device computes it with one fused reduction, whatever the
sharding, since integer addition wraps the same in any order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Fingerprint = tuple[int, int]
_MASK = (1 << 32) - 1
_HOST_BLOCK = 1 << 22  # elements per block: the widened copy stays at 32 MiB
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}


def _words(array: np.ndarray) -> np.ndarray:
  flat = np.ascontiguousarray(array).reshape(-1)
  return flat.view(_UNSIGNED[flat.dtype.itemsize])


def host_fingerprint(array: np.ndarray) -> Fingerprint:
  """The fingerprint of a host array, in blocks (bounded extra memory)."""
  words = _words(np.asarray(array))
  total = square = 0
  for start in range(0, words.size, _HOST_BLOCK):
    wide = words[start:start + _HOST_BLOCK].astype(np.uint64)
    total += int(wide.sum(dtype=np.uint64))
    square += int((wide * wide).sum(dtype=np.uint64))  # each square < 2**64; the sum wraps mod 2**64, a multiple of 2**32
  return total & _MASK, square & _MASK


def add(a: Fingerprint, b: Fingerprint) -> Fingerprint:
  """The fingerprint of the concatenation of two arrays."""
  return (a[0] + b[0]) & _MASK, (a[1] + b[1]) & _MASK


def _device_words(x: jax.Array) -> jax.Array:
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  itemsize = jnp.dtype(x.dtype).itemsize
  if itemsize == 8:
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]: the two halves, as the host view reads them
  else:
    words = jax.lax.bitcast_convert_type(x, _UNSIGNED[itemsize])
  return words.astype(jnp.uint32)


@jax.jit
def _device_sums(tree: Any) -> Any:
  def sums(x):
    w = _device_words(x)
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * w, dtype=jnp.uint32)])

  return jax.tree.map(sums, tree)


def device_fingerprints(flat: Mapping[str, jax.Array]) -> dict[str, Fingerprint]:
  """name -> fingerprint of every array in `flat`, computed where the arrays live; one small readback."""
  sums = jax.device_get(_device_sums(dict(flat)))
  return {name: (int(pair[0]), int(pair[1])) for name, pair in sums.items()}
