"""The dispatched gated delta rule under a mesh: mapped over batch and heads, same values and gradients."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_sharded_dispatch_matches_unsharded_on_8_host_devices():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  impls = ["xla", "tpu", "gpu"]
  command = [sys.executable, "-m", "tests.kernels.gdn_sharded_check", *impls]
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  print(result.stdout)
  assert result.returncode == 0, result.stdout + result.stderr[-4000:]
  for impl in impls:
    line = re.search(rf"^{impl}: shard_map=(\w+) loss_rel_err=(\S+) grad_rel_err=(\S+)$", result.stdout, re.M)
    assert line, result.stdout
    assert line.group(1) == "True", line.group(0)
    # float32 everywhere: the same arithmetic per shard, so only reduction order may differ.
    assert float(line.group(2)) < 1e-5 and float(line.group(3)) < 1e-5, line.group(0)
