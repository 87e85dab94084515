"""Continuous batching over an Engine's model: requests join the running batch at any step and leave when done.

A fixed number of rows share one persistent cache (slot_steps.py). Each `step()` admits waiting requests into
free rows (restoring any cached prefix), then runs one call in which rows still reading their prompt take its next
chunk (up to `chunk` tokens, cut at chunk-aligned positions so every chunk boundary is a prefix-cache block) and
decoding rows take their newest token, so prefill interleaves with decoding and no prompt waits for a whole
batch to finish. A finished row is free for the next request at the next step. Calls are dispatched up to
_LOOKAHEAD ahead of the one whose tokens are read back: a decoding row's input is the previous call's token, taken
on the device; a row that hits a stop token is seen one or two calls late, and what it drew meanwhile is dropped.

A request's tokens do not depend on which others share its steps: each row's inputs, cache and rng stream
(fold_in(seed, index of the token drawn)) are its own.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import weakref
from collections.abc import Sequence

import jax
import numpy as np

from maxtext import sharding
from maxtext.inference.engine import Engine, TokenEvent
from maxtext.inference.prefix_cache import PrefixCache, block_digests
from maxtext.inference.sampling import MAX_LOGPROBS, BatchSampling, SamplingParams
from maxtext.inference.slot_steps import SlotSteps


@dataclasses.dataclass
class _Request:
  id: int
  prompt: list[int]
  params: SamplingParams
  stops: frozenset[int]
  fed: int = 0  # prompt tokens in the row's caches
  generated: int = 0  # tokens drawn by dispatched calls
  emitted: int = 0  # tokens read back and handed out
  finished: bool = False
  digests: list[bytes] = dataclasses.field(default_factory=list)  # prefix-cache keys of the prompt's blocks


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _slot_steps(engine: Engine, chunk: int) -> SlotSteps:
  """One SlotSteps (so one set of compilations) per engine and chunk, whatever the number of schedulers."""
  per_engine = _COMPILED.setdefault(engine, {})
  if chunk not in per_engine:
    per_engine[chunk] = SlotSteps(engine.model, engine.max_context + chunk, chunk)
  return per_engine[chunk]


_LOOKAHEAD = 2  # calls dispatched ahead of the one being read back (the device never waits for the host)
_logger = logging.getLogger("maxtext.inference")


class Scheduler:
  """Not thread-safe: one thread submits, cancels and steps."""

  def __init__(self, engine: Engine, rows: int = 8, chunk: int = 64, prefix_cache_bytes: int = 0):
    self.engine, self.rows, self.chunk = engine, rows, chunk
    if engine.config.mtp_speculative_decoding:
      # Said, not silent: speculation lives in Engine.generate's steps; slots advance a token per call.
      _logger.info("mtp_speculative_decoding: continuous batching decodes without speculation"
                   " (server_continuous_batching=false speculates)")
    self.steps = _slot_steps(engine, chunk)
    with sharding.activate(engine.mesh):
      self.state = self.steps.empty(engine.params, rows)
    self.cache = PrefixCache(chunk, prefix_cache_bytes) if prefix_cache_bytes > 0 else None
    self._ids = itertools.count()
    self._waiting: collections.deque[_Request] = collections.deque()
    self._slots: list[_Request | None] = [None] * rows
    self._cursor = np.zeros((rows,), np.int32)
    self._sampling: BatchSampling | None = None  # rebuilt when the rows' requests change
    self._in_flight: collections.deque = collections.deque()  # (Sampled on the device, [(row, request)] drawn)
    self._previous = np.zeros((rows,), np.int32)  # the last call's tokens (a device array once one ran)
    self.stats = {"steps": 0, "tokens": 0, "prefill_tokens": 0}

  # ---- requests ----
  def submit(self, prompt: Sequence[int], params: SamplingParams) -> int:
    """Queue one prompt; its TokenEvents carry the returned id as `request`."""
    (prompt,) = self.engine._check_prompts([prompt], [params.max_tokens])  # pylint: disable=protected-access
    request = _Request(next(self._ids), prompt, params, frozenset(params.stop_token_ids))
    if params.max_tokens == 0:
      return request.id  # nothing to generate
    self._waiting.append(request)
    return request.id

  def cancel(self, request_id: int) -> None:
    self._waiting = collections.deque(r for r in self._waiting if r.id != request_id)
    for row, request in enumerate(self._slots):
      if request is not None and request.id == request_id:
        request.finished = True
        self._free(row)

  @property
  def free_rows(self) -> int:
    return self._slots.count(None) - len(self._waiting)

  @property
  def busy(self) -> bool:
    return bool(self._waiting) or bool(self._in_flight) or any(r is not None for r in self._slots)

  def prefix_cache_stats(self) -> dict[str, float]:
    return dict(self.cache.stats, bytes=self.cache.nbytes) if self.cache else {}

  # ---- one step ----
  def step(self) -> list[TokenEvent]:
    """Admit what fits and dispatch one call for every busy row; read back the oldest call once _LOOKAHEAD are in
    flight (or nothing more can be dispatched). Returns the tokens read back (possibly none yet)."""
    self._admit()
    dispatched = self._dispatch()
    if self._in_flight and (len(self._in_flight) > _LOOKAHEAD or not dispatched):
      return self._read_back()
    return []

  def _dispatch(self) -> bool:
    active = [(row, r) for row, r in enumerate(self._slots) if r is not None]
    if not active:
      return False
    length = self.chunk if any(r.fed < len(r.prompt) for _, r in active) else 1
    tokens = np.zeros((self.rows, length), np.int32)
    counts = np.zeros((self.rows,), np.int32)
    emit = np.zeros((self.rows,), bool)
    feed_previous = np.zeros((self.rows,), bool)
    draws = np.zeros((self.rows,), np.int32)
    for row, request in active:
      if request.fed < len(request.prompt):
        n = min(self.chunk - request.fed % self.chunk, len(request.prompt) - request.fed)
        tokens[row, :n] = request.prompt[request.fed : request.fed + n]
        counts[row], emit[row] = n, request.fed + n == len(request.prompt)
      else:  # decoding: its input is the token the previous call drew for this row
        counts[row], emit[row], feed_previous[row] = 1, True, True
      draws[row] = request.generated
    num_top = MAX_LOGPROBS if any(r.params.logprobs for _, r in active) else 0
    greedy_only = all(r.params.greedy for _, r in active)
    filtered = any(r.params.filtered for _, r in active)
    if self._sampling is None:
      self._sampling = BatchSampling.of([r.params if r else SamplingParams() for r in self._slots], self.rows)
    with sharding.activate(self.engine.mesh):
      self.state, sampled = self.steps.advance(
          self.engine.params, self.state, tokens, self._cursor.copy(), counts, emit, self._sampling, draws,
          self._previous, feed_previous, num_top=num_top, greedy_only=greedy_only, filtered=filtered)
    self._previous = sampled.tokens
    self.stats["steps"] += 1
    drawn = []
    for row, request in active:
      self._cursor[row] += counts[row]
      if request.fed < len(request.prompt):
        request.fed += int(counts[row])
        self.stats["prefill_tokens"] += int(counts[row])
        self._snapshot(row, request)  # before the next call takes (donates) the state
      if emit[row]:
        request.generated += 1
        drawn.append((row, request))
        if request.generated >= request.params.max_tokens:
          self._free(row)  # its last token is drawn: the row can take a newcomer at the next step
    self._in_flight.append((sampled, drawn))
    return True

  def _read_back(self) -> list[TokenEvent]:
    sampled, drawn = self._in_flight.popleft()
    sampled = jax.device_get(sampled)
    events = []
    for row, request in drawn:
      if request.finished:
        continue  # it stopped at an earlier token; calls already in flight drew on
      token = int(sampled.tokens[row])
      request.emitted += 1
      self.stats["tokens"] += 1
      done = request.emitted >= request.params.max_tokens
      reason = "stop" if token in request.stops else ("length" if done else None)
      n = request.params.logprobs
      top = tuple((int(i), float(v)) for i, v in zip(sampled.top_ids[row, :n], sampled.top_logprobs[row, :n]))
      if reason is not None:
        request.finished = True
        if self._slots[row] is request:
          self._free(row)
      events.append(TokenEvent(request.id, token, float(sampled.logprobs[row]), top, reason))
    return events

  # ---- rows ----
  def _free(self, row: int) -> None:
    self._slots[row] = None
    self._sampling = None

  def _admit(self) -> None:
    admitted = []
    for row in range(self.rows):
      if self._slots[row] is None and self._waiting:
        self._slots[row] = self._waiting.popleft()
        admitted.append(row)
    if not admitted:
      return
    self._sampling = None
    mask = np.zeros((self.rows,), bool)
    mask[admitted] = True
    with sharding.activate(self.engine.mesh):
      self.state = self.steps.reset_rows(self.state, mask)
      for row in admitted:
        request = self._slots[row]
        self._cursor[row] = 0
        if self.cache is None:
          continue
        request.digests = block_digests(request.prompt, self.chunk, self.cache.usable_blocks(len(request.prompt)))
        for index, (_, block) in enumerate(self.cache.lookup(request.prompt)):
          self.state = self.steps.write_block(self.state, np.int32(row), np.int32(index * self.chunk), block)
          request.fed = self._cursor[row] = (index + 1) * self.chunk

  def _snapshot(self, row: int, request: _Request) -> None:
    """After a whole prompt block: keep it (and the state after it) for later prompts with the same prefix."""
    if self.cache is None or request.fed % self.chunk or request.fed // self.chunk > len(request.digests):
      return
    index = request.fed // self.chunk - 1
    digest = request.digests[index]
    if self.cache.contains(digest):
      return
    with sharding.activate(self.engine.mesh):
      block = self.steps.read_block(self.state, np.int32(row), np.int32(index * self.chunk))
    self.cache.store(digest, request.digests[index - 1] if index else None, block)

  # ---- all at once ----
  def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]):
    """Engine.generate's contract over continuous batching: TokenEvents with `request` = index into prompts."""
    ids = {self.submit(p, s): i for i, (p, s) in enumerate(zip(prompts, params))}
    running = sum(1 for s in params if s.max_tokens > 0)
    while running:
      for event in self.step():
        if event.request in ids:
          running -= event.finish_reason is not None
          yield dataclasses.replace(event, request=ids[event.request])
