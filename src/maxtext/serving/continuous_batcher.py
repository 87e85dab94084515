"""The Batcher over continuous batching: prompts join the running batch (inference/scheduler.py) as rows free up,
instead of waiting for a whole static batch to finish.

The worker thread loops: take new requests; run one scoring batch if any waits (scoring is one forward pass, it
slips in between steps); hand waiting prompts to free rows, one prompt of each request in turn (fair scheduling);
run one step and route its tokens to their requests. A prompt the engine refuses fails its own request alone.
When idle, it waits `window_s` after a request arrives, so requests sent together start in the same step.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Any

from maxtext.serving.batcher import _GENERATE, _SCORE, Batcher, _Failed, _Job, _Unit

log = logging.getLogger(__name__)


class ContinuousBatcher(Batcher):

  def __init__(self, engine: Any, scheduler: Any, window_s: float = 0.01, max_batch: int = 8,
               timeout_s: float = 0.0, invariant_scoring: bool = False):
    self.scheduler = scheduler
    self._running: dict[int, tuple[_Job, int]] = {}  # scheduler request id -> (job, prompt index)
    super().__init__(engine, window_s=window_s, max_batch=max_batch, timeout_s=timeout_s,
                     invariant_scoring=invariant_scoring)

  def prefix_cache_stats(self) -> dict[str, float]:
    return self.scheduler.prefix_cache_stats()

  # ---- worker side ----
  def _work(self) -> None:
    while True:
      if not self._gather():
        return
      self._drop_abandoned()
      self._run_one_score_batch()
      self._admit()
      self.stats.running_prompts = len(self._running)
      if self.scheduler.busy:
        self._step()

  def _gather(self) -> bool:
    """Take new requests: block while idle (then wait out the window), else only what is there. False: closing."""
    idle = not self._jobs and not self.scheduler.busy
    if idle:
      if not self._take_inbox(block=True):
        return False
      deadline = time.monotonic() + self.window_s
      while (left := deadline - time.monotonic()) > 0:
        if not self._take_inbox(block=True, timeout=left):
          return False
    while not self._inbox.empty():
      if not self._take_inbox(block=False):
        return False
    return True

  def _drop_abandoned(self) -> None:
    for request_id, (job, _) in list(self._running.items()):
      if job.abandoned:
        self.scheduler.cancel(request_id)
        del self._running[request_id]
    for job in [j for j in self._jobs if j.abandoned]:
      self.stats.waiting_prompts -= len(job.waiting)
      job.waiting.clear()
    self._jobs = collections.deque(j for j in self._jobs if j.waiting)

  def _take_round_robin(self, kind: str, limit: int) -> list[_Unit]:
    """Up to `limit` waiting prompts of this kind, one per request in turn; served requests move to the back."""
    units: list[_Unit] = []
    while len(units) < limit:
      job = next((j for j in self._jobs if j.kind == kind and j.waiting), None)
      if job is None:
        break
      units.append(_Unit(job, job.waiting.popleft()))
      self._jobs.remove(job)
      if job.waiting:
        self._jobs.append(job)
    self.stats.waiting_prompts -= len(units)
    return units

  def _run_one_score_batch(self) -> None:
    batch = self._take_round_robin(_SCORE, self.max_batch)
    if batch:
      self._run(batch)

  def _admit(self) -> None:
    units = self._take_round_robin(_GENERATE, max(0, self.scheduler.free_rows))
    for unit in units:
      try:
        request_id = self.scheduler.submit(unit.prompt, unit.job.params[unit.index])
      except Exception as e:  # pylint: disable=broad-except  # the engine refuses this prompt: its request alone
        unit.job.post(_Failed(e))
        unit.job.abandoned = True
        continue
      if unit.job.params[unit.index].max_tokens > 0:
        self._running[request_id] = (unit.job, unit.index)
    if units:
      log.info("admitted %d prompt(s) into the running batch (%d running)", len(units), len(self._running))

  def _step(self) -> None:
    self.calls.append((_GENERATE, len(self._running)))
    self.stats.engine_calls += 1
    try:
      events = self.scheduler.step()
    except Exception as e:  # pylint: disable=broad-except  # a device failure: every running request hears it
      self.stats.failed_calls += 1
      log.exception("engine step failed")
      for request_id, (job, _) in list(self._running.items()):
        job.post(_Failed(e))
        self.scheduler.cancel(request_id)
      self._running.clear()
      return
    for event in events:
      owner = self._running.get(event.request)
      if owner is None:
        continue
      job, index = owner
      self.stats.generated_tokens += 1
      job.post(dataclasses.replace(event, request=index))
      if event.finish_reason is not None:
        del self._running[event.request]
