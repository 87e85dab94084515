"""Batch concurrent requests into single Engine calls, on one worker thread (the Engine is not thread-safe).

Each request is split into its prompts; the worker takes the first waiting prompt, waits up to `window_s` for
others of the same kind (generate or score) to arrive, and runs up to `max_batch` of them in one Engine call.
Generated tokens stream back to each request's asyncio queue as the Engine yields them. A batch stops early once
every request in it has finished or been abandoned (client gone, stop string reached).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

log = logging.getLogger(__name__)

_GENERATE, _SCORE = "generate", "score"


class _Job:
  """One request: its prompts, where results go, and whether anyone still listens."""

  def __init__(self, kind: str, prompts: Sequence[Sequence[int]], loop: asyncio.AbstractEventLoop,
               params: Sequence[Any] | None = None, top_n: int = 0):
    self.kind, self.prompts, self.params, self.top_n = kind, [list(p) for p in prompts], params, top_n
    self.loop = loop
    self.results: asyncio.Queue = asyncio.Queue()
    self.abandoned = False

  def post(self, item: Any) -> None:
    """Thread-safe hand-over of an event, a score, or an exception to the request's coroutine."""
    try:
      self.loop.call_soon_threadsafe(self.results.put_nowait, item)
    except RuntimeError:  # the event loop is gone (server shutting down)
      self.abandoned = True


@dataclasses.dataclass
class _Unit:
  job: _Job
  index: int  # the prompt's index within its request
  finished: bool = False

  @property
  def prompt(self) -> list[int]:
    return self.job.prompts[self.index]


@dataclasses.dataclass(frozen=True)
class _Scored:
  index: int
  scores: Any


@dataclasses.dataclass(frozen=True)
class _Failed:
  error: BaseException


class Batcher:
  """`await score(...)` and `async for event in generate(...)` from request handlers; calls run batched."""

  def __init__(self, engine: Any, window_s: float = 0.01, max_batch: int = 8):
    self.engine, self.window_s, self.max_batch = engine, window_s, max_batch
    self._inbox: queue.Queue = queue.Queue()
    self._backlog: collections.deque[_Unit] = collections.deque()  # taken from the inbox, not yet run
    self.calls: collections.deque[tuple[str, int]] = collections.deque(maxlen=1024)  # (kind, prompts) per Engine call
    self._thread = threading.Thread(target=self._work, name="engine-batcher", daemon=True)
    self._thread.start()

  # ---- request side (event loop) ----
  async def score(self, prompts: Sequence[Sequence[int]], top_n: int = 0) -> list[Any]:
    job = _Job(_SCORE, prompts, asyncio.get_running_loop(), top_n=top_n)
    self._submit(job)
    scores: list[Any] = [None] * len(job.prompts)
    try:
      for _ in job.prompts:
        item = await job.results.get()
        if isinstance(item, _Failed):
          raise item.error
        scores[item.index] = item.scores
    finally:
      job.abandoned = True
    return scores

  async def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[Any]) -> AsyncIterator[Any]:
    """Token events of these prompts, `request` renumbered to the index within `prompts`."""
    job = _Job(_GENERATE, prompts, asyncio.get_running_loop(), params=params)
    self._submit(job)
    running = len(job.prompts)
    try:
      while running:
        item = await job.results.get()
        if isinstance(item, _Failed):
          raise item.error
        if item.finish_reason is not None:
          running -= 1
        yield item
    finally:
      job.abandoned = True

  def _submit(self, job: _Job) -> None:
    if not self._thread.is_alive():
      raise RuntimeError("the engine worker has stopped")
    for index in range(len(job.prompts)):
      self._inbox.put(_Unit(job, index))

  def close(self) -> None:
    self._inbox.put(None)
    self._thread.join(timeout=5)

  # ---- worker side (one thread) ----
  def _work(self) -> None:
    while True:
      batch = self._next_batch()
      if batch is None:
        return
      if not batch:
        continue
      kind = batch[0].job.kind
      self.calls.append((kind, len(batch)))
      start = time.perf_counter()
      try:
        if kind == _SCORE:
          self._run_score(batch)
        else:
          self._run_generate(batch)
      except Exception as e:  # pylint: disable=broad-except
        log.exception("engine %s call failed", kind)
        for job in {id(u.job): u.job for u in batch}.values():
          job.post(_Failed(e))
      log.info("%s batch of %d prompt(s) in %.2fs", kind, len(batch), time.perf_counter() - start)

  def _next_batch(self) -> list[_Unit] | None:
    """Up to max_batch live units of the first waiting unit's kind; None when closing."""
    if not self._backlog:
      first = self._inbox.get()
      if first is None:
        return None
      self._backlog.append(first)
    deadline = time.monotonic() + self.window_s
    while len(self._backlog) < self.max_batch:
      try:
        unit = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        break
      if unit is None:
        self._inbox.put(None)  # finish this batch, then stop
        break
      self._backlog.append(unit)
    kind = self._backlog[0].job.kind
    batch, rest = [], collections.deque()
    while self._backlog:
      unit = self._backlog.popleft()
      if unit.job.abandoned:
        continue
      (batch if unit.job.kind == kind and len(batch) < self.max_batch else rest).append(unit)
    self._backlog = rest
    return batch

  def _run_score(self, batch: list[_Unit]) -> None:
    top_n = max(u.job.top_n for u in batch)
    results = self.engine.score([u.prompt for u in batch], top_n=top_n)
    for unit, scores in zip(batch, results):
      if unit.job.top_n < top_n:
        scores = dataclasses.replace(scores, top_logprobs=[alts[: unit.job.top_n] for alts in scores.top_logprobs])
      unit.job.post(_Scored(unit.index, scores))

  def _run_generate(self, batch: list[_Unit]) -> None:
    events = self.engine.generate([u.prompt for u in batch], [u.job.params[u.index] for u in batch])
    try:
      for event in events:
        unit = batch[event.request]
        if unit.finished:
          continue
        unit.job.post(dataclasses.replace(event, request=unit.index))
        unit.finished = event.finish_reason is not None
        if all(u.finished or u.job.abandoned for u in batch):
          break
    finally:
      close = getattr(events, "close", None)
      if close is not None:
        close()
    missing = [u for u in batch if not u.finished and not u.job.abandoned]
    for unit in missing:
      unit.job.post(_Failed(RuntimeError(f"the engine stopped before prompt {unit.index} finished")))
