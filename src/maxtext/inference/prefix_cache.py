"""Prefix cache: what a prompt's first k * block tokens left in a row's caches, for the next prompt that starts with
the same tokens (a system prompt, few-shot examples).

A prompt's tokens are cut into blocks of `block` tokens (the prefill chunk). Block i is stored under a digest of
every token up to its end (so equal digests mean equal prefixes, not just equal blocks) and holds the attention
keys/values of its own slots plus the Gated DeltaNet conv inputs and recurrent state after its last token, kept in
float32 (a recurrent state cannot be recomputed from the keys/values like attention's; a bf16 copy would make a
hit differ from a cold run). A hit of depth k restores blocks 1..k's keys/values and block k's state.

Entries live on the device and are counted against `budget_bytes`; the least recently used entry with no cached
continuation is dropped first (a prefix's parents stay while a child is cached, so a lookup's path never breaks).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass
class _Entry:
  block: Any  # slot_steps.read_block's tree for this block
  nbytes: int
  parent: bytes | None
  children: int = 0


def block_digests(tokens: Sequence[int], block: int, count: int) -> list[bytes]:
  """Digests of the prompt's first `count` whole blocks, each covering every token from the start."""
  digests, running = [], hashlib.blake2b(digest_size=16)
  array = np.asarray(tokens, np.int64)
  for i in range(count):
    running.update(array[i * block : (i + 1) * block].tobytes())
    digests.append(running.copy().digest())
  return digests


class PrefixCache:

  def __init__(self, block: int, budget_bytes: int):
    self.block, self.budget_bytes = block, budget_bytes
    self._entries: collections.OrderedDict[bytes, _Entry] = collections.OrderedDict()  # oldest use first
    self.nbytes = 0
    self.stats = {"lookups": 0, "hits": 0, "hit_tokens": 0, "stored_blocks": 0, "evicted_blocks": 0}

  def __len__(self) -> int:
    return len(self._entries)

  def usable_blocks(self, prompt_length: int) -> int:
    """Blocks a prompt may take from the cache: at least its last token must run, to give the next token."""
    return (prompt_length - 1) // self.block

  def lookup(self, tokens: Sequence[int]) -> list[tuple[bytes, Any]]:
    """The longest cached prefix of whole blocks: [(digest, block tree)] from the first block on."""
    self.stats["lookups"] += 1
    found = []
    for digest in block_digests(tokens, self.block, self.usable_blocks(len(tokens))):
      entry = self._entries.get(digest)
      if entry is None:
        break
      self._entries.move_to_end(digest)
      found.append((digest, entry.block))
    if found:
      self.stats["hits"] += 1
      self.stats["hit_tokens"] += len(found) * self.block
    return found

  def contains(self, digest: bytes) -> bool:
    return digest in self._entries

  def store(self, digest: bytes, parent: bytes | None, block: Any) -> None:
    """Keep block (its parent, the previous block's digest, must be cached unless this is the first)."""
    if digest in self._entries or (parent is not None and parent not in self._entries):
      return
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(block))
    if nbytes > self.budget_bytes:
      return
    self._entries[digest] = _Entry(block, nbytes, parent)
    if parent is not None:
      self._entries[parent].children += 1
    self.nbytes += nbytes
    self.stats["stored_blocks"] += 1
    self._evict(keep=digest)

  def _evict(self, keep: bytes) -> None:
    while self.nbytes > self.budget_bytes:
      victim = next((d for d, e in self._entries.items() if e.children == 0 and d != keep), None)
      if victim is None:
        return
      entry = self._entries.pop(victim)
      self.nbytes -= entry.nbytes
      self.stats["evicted_blocks"] += 1
      if entry.parent is not None and entry.parent in self._entries:
        self._entries[entry.parent].children -= 1
