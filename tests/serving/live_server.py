"""Start the server for real: uvicorn in a thread (any ASGI app) or the documented CLI in a subprocess."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE_YML = os.path.join(REPO, "src", "maxtext", "configs", "base.yml")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_healthy(base_url: str, timeout: float, alive=lambda: True) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if not alive():
      raise RuntimeError("the server exited during startup")
    try:
      with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
        if response.status == 200:
          return
    except OSError:
      time.sleep(0.2)
  raise TimeoutError(f"no answer from {base_url}/health within {timeout}s")


@contextlib.contextmanager
def serve_in_thread(app):
  import uvicorn

  port = free_port()
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  base_url = f"http://127.0.0.1:{port}"
  try:
    wait_healthy(base_url, 30, thread.is_alive)
    yield base_url
  finally:
    server.should_exit = True
    thread.join(timeout=10)


@contextlib.contextmanager
def fake_server(tokenizer, script: list[int], window_s: float = 0.1, max_context: int = 64, engine=None,
                sampling_params_type=None, timeout_s: float = 0.0, api_key: str = "", max_body_bytes: int = 8 << 20,
                **model_kwargs):
  """(base_url, engine, served model): the real app and uvicorn over the scripted FakeEngine (or `engine`)."""
  from maxtext.serving.app import build_app
  from maxtext.serving.batcher import Batcher
  from maxtext.serving.served_model import ServedModel
  from tests.serving.fake_engine import FakeEngine, FakeSamplingParams

  engine = engine or FakeEngine(script, max_context=max_context)
  model = ServedModel(Batcher(engine, window_s=window_s, max_batch=8, timeout_s=timeout_s), tokenizer, "tiny",
                      engine.max_context, len(tokenizer), sampling_params_type or FakeSamplingParams, **model_kwargs)
  with serve_in_thread(build_app(model, api_key=api_key, max_body_bytes=max_body_bytes)) as base_url:
    yield base_url, engine, model


class ServerProcess:
  """`python3 -m maxtext.serving.server BASE_YML key=value ...` on a free port; output goes to `log_path`."""

  def __init__(self, overrides: list[str], log_path: str, startup_timeout: float = 300):
    self.port = free_port()
    self.base_url = f"http://127.0.0.1:{self.port}"
    self.log_path = log_path
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    env.pop("XLA_FLAGS", None)  # one host device: the server does not need the tests' forced device count
    self._log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
    self.process = subprocess.Popen(
        [sys.executable, "-m", "maxtext.serving.server", BASE_YML, f"server_port={self.port}", *overrides],
        cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
    )
    try:
      wait_healthy(self.base_url, startup_timeout, lambda: self.process.poll() is None)
    except BaseException:
      self.stop()
      raise RuntimeError(f"server did not start:\n{self.log()[-4000:]}") from None

  def log(self) -> str:
    with open(self.log_path, encoding="utf-8") as f:
      return f.read()

  def stop(self) -> None:
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=20)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    self._log.close()


QWEN_VOCAB = 151936  # real prompts go through the Qwen3 tokenizer


@dataclasses.dataclass(frozen=True)
class RealServer:
  base_url: str
  model_id: str
  max_context: int
  hf_model: object  # the transformers model the checkpoint came from: the independent reference
  process: ServerProcess


@functools.cache
def tiny_checkpoint_server() -> RealServer:
  """The documented server CLI on a tiny random HF checkpoint converted to orbax; one per test session."""
  from maxtext.checkpoint_conversion import to_maxtext
  from maxtext.configs import load_config
  from tests.conftest import build_hf_tiny

  root = tempfile.mkdtemp(prefix="maxtext-serving-")
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  hf = build_hf_tiny("grouped_values", os.path.join(root, "hf"), vocab_size=QWEN_VOCAB)
  items = to_maxtext.convert(load_config([f"hf_model_path={hf.path}"]), hf.path, os.path.join(root, "ckpt", "0"),
                             log=lambda *_: None)
  max_context = 256
  # A wide gather window: concurrent test requests must land in one batch even on a loaded 2-core CI machine
  # (100 ms once split three requests sent together into two batches there).
  process = ServerProcess(
      [f"load_parameters_path={items}", "dtype=float32", f"max_target_length={max_context}",
       "served_model_name=tiny-qwen3-next", "server_batch_window_ms=500", "server_max_batch_size=8"],
      os.path.join(root, "server.log"),
  )
  atexit.register(process.stop)
  return RealServer(process.base_url, "tiny-qwen3-next", max_context, hf.model, process)
