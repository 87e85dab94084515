"""Batch concurrent requests into single Engine calls, on one worker thread (the Engine is not thread-safe).

Each request (a job) carries one or more prompts. The worker waits up to `window_s` after the first waiting job for
others to arrive, then fills a batch of up to `max_batch` prompts of one kind (generate or score) round-robin over
the waiting jobs, one prompt of each in turn: a request of 400 prompts shares every batch with the requests that
came after it instead of making them wait for all 400 (fair scheduling). Generated tokens stream back to each
request's asyncio queue as the Engine yields them; a batch stops early once every request in it has finished or
been abandoned (client gone, stop string reached, timeout).

A failing Engine call is retried prompt by prompt before anything of it was handed out, so one bad prompt fails
its own request alone, never its batch mates (no batch poisoning).
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

from maxtext.serving import errors

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
    self.waiting = collections.deque(range(len(self.prompts)))  # prompt indices not yet in a batch (worker only)

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


@dataclasses.dataclass
class BatcherStats:
  """Counters read by /metrics (written by the worker thread, read anywhere: plain ints, no locking needed)."""

  waiting_prompts: int = 0
  running_prompts: int = 0
  engine_calls: int = 0
  generated_tokens: int = 0
  scored_tokens: int = 0
  failed_calls: int = 0
  timed_out_requests: int = 0


def _client_error(error: BaseException) -> BaseException:
  """The Engine raises ValueError for input it refuses: that is the client's 400, not a server error."""
  if isinstance(error, ValueError) and not isinstance(error, errors.APIError):
    return errors.bad_request(str(error))
  return error


class Batcher:
  """`await score(...)` and `async for event in generate(...)` from request handlers; calls run batched."""

  def __init__(self, engine: Any, window_s: float = 0.01, max_batch: int = 8, timeout_s: float = 0.0,
               invariant_scoring: bool = False):
    self.engine, self.window_s, self.max_batch, self.timeout_s = engine, window_s, max_batch, timeout_s
    self.invariant_scoring = invariant_scoring  # a prompt's scores independent of its batch mates (Engine.score)
    self._inbox: queue.Queue = queue.Queue()
    self._jobs: collections.deque[_Job] = collections.deque()  # taken from the inbox, prompts left to run
    self.calls: collections.deque[tuple[str, int]] = collections.deque(maxlen=1024)  # (kind, prompts) per Engine call
    self.stats = BatcherStats()
    self._thread = threading.Thread(target=self._work, name="engine-batcher", daemon=True)
    self._thread.start()

  # ---- request side (event loop) ----
  async def _next(self, job: _Job, deadline: float | None) -> Any:
    if deadline is None:
      item = await job.results.get()
    else:
      try:
        item = await asyncio.wait_for(job.results.get(), max(0.0, deadline - time.monotonic()))
      except asyncio.TimeoutError:
        self.stats.timed_out_requests += 1
        raise errors.APIError(408, f"the request did not finish within server_request_timeout_s"
                                   f" ({self.timeout_s:g} s)", code="timeout") from None
    if isinstance(item, _Failed):
      raise _client_error(item.error)
    return item

  def _deadline(self) -> float | None:
    return time.monotonic() + self.timeout_s if self.timeout_s > 0 else None

  async def score(self, prompts: Sequence[Sequence[int]], top_n: int = 0) -> list[Any]:
    job = _Job(_SCORE, prompts, asyncio.get_running_loop(), top_n=top_n)
    deadline = self._deadline()
    self._submit(job)
    scores: list[Any] = [None] * len(job.prompts)
    try:
      for _ in job.prompts:
        item = await self._next(job, deadline)
        scores[item.index] = item.scores
    finally:
      job.abandoned = True
    return scores

  async def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[Any]) -> AsyncIterator[Any]:
    """Token events of these prompts, `request` renumbered to the index within `prompts`."""
    job = _Job(_GENERATE, prompts, asyncio.get_running_loop(), params=params)
    deadline = self._deadline()
    self._submit(job)
    running = len(job.prompts)
    try:
      while running:
        item = await self._next(job, deadline)
        if item.finish_reason is not None:
          running -= 1
        yield item
    finally:
      job.abandoned = True

  def _submit(self, job: _Job) -> None:
    if not self._thread.is_alive():
      raise RuntimeError("the engine worker has stopped")
    self.stats.waiting_prompts += len(job.prompts)
    self._inbox.put(job)

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
      self.stats.waiting_prompts -= len(batch)
      self.stats.running_prompts = len(batch)
      start = time.perf_counter()
      self._run(batch)
      self.stats.running_prompts = 0
      log.info("%s batch of %d prompt(s) in %.2fs", batch[0].job.kind, len(batch), time.perf_counter() - start)

  def _run(self, batch: list[_Unit]) -> None:
    """One Engine call; when it fails before handing anything out, each prompt again on its own."""
    kind = batch[0].job.kind
    self.calls.append((kind, len(batch)))
    self.stats.engine_calls += 1
    handed_out = [0]
    try:
      if kind == _SCORE:
        self._run_score(batch)
      else:
        self._run_generate(batch, handed_out)
    except Exception as e:  # pylint: disable=broad-except
      self.stats.failed_calls += 1
      if len(batch) > 1 and not handed_out[0]:
        log.warning("engine %s call of %d prompts failed (%s): retrying them one by one", kind, len(batch), e)
        for unit in batch:
          self._run([unit])
        return
      log.exception("engine %s call failed", kind)
      for job in {id(u.job): u.job for u in batch}.values():
        job.post(_Failed(e))

  def _take_inbox(self, block: bool, timeout: float | None = None) -> bool:
    """Move waiting jobs from the inbox; False when closing."""
    try:
      job = self._inbox.get(block=block, timeout=timeout)
    except queue.Empty:
      return True
    if job is None:
      return False
    self._jobs.append(job)
    return True

  def _live_units(self) -> int:
    return sum(len(j.waiting) for j in self._jobs if not j.abandoned)

  def _next_batch(self) -> list[_Unit] | None:
    """Up to max_batch prompts of the oldest waiting job's kind, one per job in turn; None when closing."""
    closing = False
    if not self._jobs and not self._take_inbox(block=True):
      return None
    deadline = time.monotonic() + self.window_s
    while not closing and self._live_units() < self.max_batch:
      left = deadline - time.monotonic()
      if left <= 0:
        break
      closing = not self._take_inbox(block=True, timeout=left)
    while not closing and not self._inbox.empty():  # newcomers always get their turn, even into a full batch
      closing = not self._take_inbox(block=False)
    if closing:
      self._inbox.put(None)  # finish this batch, then stop
    for job in [j for j in self._jobs if j.abandoned]:
      self.stats.waiting_prompts -= len(job.waiting)
      job.waiting.clear()
    self._jobs = collections.deque(j for j in self._jobs if j.waiting)
    if not self._jobs:
      return []
    kind = self._jobs[0].kind
    takers = [j for j in self._jobs if j.kind == kind]
    batch: list[_Unit] = []
    while len(batch) < self.max_batch and any(j.waiting for j in takers):
      for job in takers:
        if job.waiting and len(batch) < self.max_batch:
          batch.append(_Unit(job, job.waiting.popleft()))
    # Jobs that got a turn go to the back: the next batch starts with whoever waited longest.
    served = {id(u.job) for u in batch}
    self._jobs = collections.deque([j for j in self._jobs if id(j) not in served and j.waiting]
                                   + [j for j in self._jobs if id(j) in served and j.waiting])
    return batch

  def _run_score(self, batch: list[_Unit]) -> None:
    top_n = max(u.job.top_n for u in batch)
    invariant = {"batch_invariant": True} if self.invariant_scoring else {}
    results = self.engine.score([u.prompt for u in batch], top_n=top_n, **invariant)
    self.stats.scored_tokens += sum(len(u.prompt) for u in batch)
    for unit, scores in zip(batch, results):
      if unit.job.top_n < top_n:
        scores = dataclasses.replace(scores, top_logprobs=[alts[: unit.job.top_n] for alts in scores.top_logprobs])
      unit.job.post(_Scored(unit.index, scores))

  def _run_generate(self, batch: list[_Unit], handed_out: list[int]) -> None:
    events = self.engine.generate([u.prompt for u in batch], [u.job.params[u.index] for u in batch])
    try:
      for event in events:
        unit = batch[event.request]
        if unit.finished:
          continue
        unit.job.post(dataclasses.replace(event, request=unit.index))
        handed_out[0] += 1
        self.stats.generated_tokens += 1
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
