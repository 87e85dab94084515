"""Where the device time goes: run a function under the JAX profiler and total its GPU kernels by name.

  from trace_summary import profile
  table = profile(lambda: step(), log_dir="/tmp/trace", top=25)   # markdown: kernel, calls, total ms, share

Reads the profiler's own `*.trace.json.gz` (no TensorBoard or xprof needed). Device events are those of the
processes whose name mentions a GPU; kernels are grouped by name with the trailing numeric suffixes XLA adds
(`fusion.123` -> `fusion`) kept, so one fusion stays one row.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
from collections.abc import Callable


def _device_events(trace: dict) -> list[dict]:
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in trace.get("traceEvents", [])
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu_pids = {pid for pid, name in names.items() if "GPU" in name or "gpu" in name}
  return [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e]


def _newest_device_events(log_dir: str) -> list[dict] | None:
  """The device events of the newest trace under log_dir, or None when there is none."""
  files = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.trace.json.gz")), key=os.path.getmtime)
  if not files:
    return None
  with gzip.open(files[-1], "rb") as f:
    return _device_events(json.load(f))


def kernel_totals(log_dir: str, repeats: int = 1) -> dict[str, float]:
  """ms per kernel name in the newest trace under log_dir (divided by repeats), largest first; {} without one."""
  totals = collections.Counter()
  for e in _newest_device_events(log_dir) or ():
    totals[e["name"]] += e["dur"]
  return {name: total / 1e3 / repeats for name, total in totals.most_common()}


def summarize(log_dir: str, top: int = 25, repeats: int = 1) -> str:
  """Markdown table of the newest trace under log_dir: per kernel name, calls and total ms (divided by repeats)."""
  events = _newest_device_events(log_dir)
  if events is None:
    return f"(no trace under {log_dir})"
  totals, calls = collections.Counter(), collections.Counter()
  for e in events:
    totals[e["name"]] += e["dur"]
    calls[e["name"]] += 1
  whole = sum(totals.values()) or 1.0
  span = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) if events else 0.0
  rows = [f"device busy {whole / 1e3 / repeats:.3f} ms, wall span {span / 1e3 / repeats:.3f} ms per repeat "
          f"({len(events) / repeats:.0f} device events)", "", "| kernel | calls | ms | share |", "|---|---|---|---|"]
  for name, total in totals.most_common(top):
    rows.append(f"| {name[:90]} | {calls[name] / repeats:g} | {total / 1e3 / repeats:.3f} | {total / whole:.1%} |")
  return "\n".join(rows)


def breakdown(log_dir: str, kernel_substring: str, top: int = 15, repeats: int = 1) -> str:
  """For the kernels whose name contains kernel_substring (e.g. 'memcpy'), total ms per HLO op (trace args)."""
  events = _newest_device_events(log_dir)
  if events is None:
    return f"(no trace under {log_dir})"
  events = [e for e in events if kernel_substring in e["name"]]
  totals = collections.Counter()
  for e in events:
    args = e.get("args", {})
    totals[str(args.get("hlo_op") or args.get("long_name") or sorted(args.items()))[:120]] += e["dur"]
  rows = [f"| {kernel_substring}: hlo op | ms |", "|---|---|"]
  rows += [f"| {op} | {t / 1e3 / repeats:.3f} |" for op, t in totals.most_common(top)]
  return "\n".join(rows)


def profile(fn: Callable[[], object], log_dir: str, top: int = 25, repeats: int = 1) -> str:
  """Run fn() `repeats` times under the profiler (fn must block until its device work is done)."""
  import jax

  with jax.profiler.trace(log_dir):
    for _ in range(repeats):
      fn()
  return summarize(log_dir, top, repeats)
