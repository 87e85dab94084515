"""The decoder's per-layer pattern (HF `layer_types`) and the repeating block the scanned form stacks.

A model states its pattern either as `full_attention_interval` (every k-th layer full attention, the rest Gated
DeltaNet: Qwen3-Next's rule) or as an explicit `decoder_layer_types` list, which may be any sequence. Scanning
stacks the shortest block that repeats over the whole model; a pattern with no shorter repeat is scanned as one
block of all its layers (correct, but compiled like the unscanned form).
"""

from __future__ import annotations

from collections.abc import Sequence

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"
LAYER_TYPES = (LINEAR_ATTENTION, FULL_ATTENTION)


def interval_pattern(num_layers: int, interval: int) -> tuple[str, ...]:
  """Every `interval`-th layer full attention (1-based), the others linear attention."""
  return tuple(FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(num_layers))


def parse_layer_types(text: str) -> tuple[str, ...]:
  """'linear_attention,full_attention,...' -> tuple; raises ValueError naming the first unknown entry."""
  entries = tuple(part.strip() for part in text.split(",") if part.strip())
  for index, entry in enumerate(entries):
    if entry not in LAYER_TYPES:
      raise ValueError(f"entry {index} is '{entry}', expected one of {', '.join(LAYER_TYPES)}")
  return entries


def format_layer_types(layer_types: Sequence[str]) -> str:
  return ",".join(layer_types)


def block_length(layer_types: Sequence[str]) -> int:
  """Length of the shortest block whose repeats make up the whole pattern (the whole length if none)."""
  count = len(layer_types)
  for length in range(1, count + 1):
    if count % length == 0 and all(layer_types[i] == layer_types[i % length] for i in range(count)):
      return length
  return count


def periodic_interval(layer_types: Sequence[str]) -> int | None:
  """k when the pattern is exactly 'every k-th layer full attention', else None."""
  full = [i for i, t in enumerate(layer_types) if t == FULL_ATTENTION]
  if not full:
    return None
  interval = full[0] + 1
  return interval if tuple(layer_types) == interval_pattern(len(layer_types), interval) else None
