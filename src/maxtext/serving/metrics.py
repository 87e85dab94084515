"""GET /metrics: Prometheus text of the server's queue, running batch, throughput, responses and prefix cache."""

from __future__ import annotations

import collections
import time
from typing import Any

_RATE_WINDOW_S = 10.0


class Throughput:
  """Tokens per second over the last few seconds, from the batcher's running token counter sampled at scrapes."""

  def __init__(self):
    self._samples: collections.deque[tuple[float, int]] = collections.deque()

  def rate(self, total: int) -> float:
    now = time.monotonic()
    self._samples.append((now, total))
    while len(self._samples) > 2 and now - self._samples[1][0] >= _RATE_WINDOW_S:
      self._samples.popleft()
    (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def render(stats: Any, responses: dict[int, int], rate: float, cache: dict[str, float] | None) -> str:
  """The exposition text; `cache` holds the engine's prefix-cache counters when it has one."""
  lines = []

  def metric(name: str, kind: str, help_text: str, value: float, labels: str = "") -> None:
    if not any(line.startswith(f"# TYPE maxtext_{name} ") for line in lines):
      lines.extend([f"# HELP maxtext_{name} {help_text}", f"# TYPE maxtext_{name} {kind}"])
    lines.append(f"maxtext_{name}{labels} {value:g}")

  metric("queue_prompts", "gauge", "Prompts waiting for a batch.", max(0, stats.waiting_prompts))
  metric("running_prompts", "gauge", "Prompts in the engine call now running.", stats.running_prompts)
  metric("engine_calls_total", "counter", "Engine calls made.", stats.engine_calls)
  metric("engine_failed_calls_total", "counter", "Engine calls that raised.", stats.failed_calls)
  metric("generated_tokens_total", "counter", "Tokens generated.", stats.generated_tokens)
  metric("scored_tokens_total", "counter", "Prompt tokens scored (echo with logprobs).", stats.scored_tokens)
  metric("generation_tokens_per_second", "gauge", "Generated tokens per second, recent.", rate)
  metric("timed_out_requests_total", "counter", "Requests answered 408 (server_request_timeout_s).",
         stats.timed_out_requests)
  for status, count in sorted(responses.items()):
    metric("http_responses_total", "counter", "HTTP responses by status code.", count, f'{{status="{status}"}}')
  cache = cache or {}
  lookups = cache.get("lookups", 0)
  metric("prefix_cache_lookups_total", "counter", "Prefix cache lookups.", lookups)
  metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
         cache.get("hit_tokens", 0))
  metric("prefix_cache_hit_rate", "gauge", "Share of lookups that hit.", cache.get("hits", 0) / lookups if lookups
         else 0.0)
  return "\n".join(lines) + "\n"
