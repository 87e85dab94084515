"""The README's main job: build the tiny model, run a forward pass, print logits statistics."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_forward_pass_command_prints_finite_logits():
  env = {**os.environ, "XLA_FLAGS": ""}  # one device, as on a fresh machine
  result = subprocess.run(
      [sys.executable, "-m", "maxtext.forward_pass", "src/maxtext/configs/base.yml", "max_target_length=40"],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert "logits [1, 40, 512] bfloat16" in result.stdout
  assert "finite True" in result.stdout
