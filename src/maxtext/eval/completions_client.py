"""Log-likelihoods of continuations through an OpenAI-compatible /v1/completions endpoint (ours or any other).

One request per context: the prompts `context + continuation` for every continuation, with echo=true,
max_tokens=0 and logprobs=0, so the server scores them without generating; a continuation's log-likelihood is the
sum of the log-probs of the tokens after the context (found by the tokens' text offsets)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any


class ServerError(RuntimeError):
  """The server could not be reached or answered with an error; the message says which."""


def api_root(server: str) -> str:
  """'http://host:port', 'http://host:port/', '.../v1' -> 'http://host:port/v1'."""
  root = server.rstrip("/")
  return root if root.endswith("/v1") else root + "/v1"


class CompletionsScorer:

  def __init__(self, server: str, model: str | None = None, timeout: float = 600.0):
    self.root, self.timeout = api_root(server), timeout
    self.model = model or self._first_model()

  def _request(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(self.root + path, data=data, headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(request, timeout=self.timeout) as response:
        return json.loads(response.read())
    except urllib.error.HTTPError as e:
      try:
        message = json.loads(e.read())["error"]["message"]
      except (ValueError, KeyError, TypeError):
        message = e.reason
      raise ServerError(f"{self.root}{path} answered {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
      raise ServerError(f"cannot reach the server at {self.root}: {getattr(e, 'reason', e)}") from None

  def _first_model(self) -> str:
    models = self._request("/models").get("data") or []
    if not models:
      raise ServerError(f"{self.root}/models lists no model")
    return models[0]["id"]

  def __call__(self, context: str, continuations: Sequence[str]) -> list[float]:
    body = {"model": self.model, "prompt": [context + c for c in continuations], "max_tokens": 0, "echo": True,
            "logprobs": 0, "temperature": 0.0}
    choices = sorted(self._request("/completions", body)["choices"], key=lambda c: c["index"])
    if len(choices) != len(continuations):
      raise ServerError(f"asked to score {len(continuations)} prompts, got {len(choices)} choices")
    return [continuation_logprob(choice["logprobs"], len(context)) for choice in choices]


def continuation_logprob(logprobs: dict[str, Any], context_chars: int) -> float:
  """Sum of the log-probs of the tokens that end past the first `context_chars` characters."""
  total, found = 0.0, False
  for token, offset, value in zip(logprobs["tokens"], logprobs["text_offset"], logprobs["token_logprobs"]):
    if offset + len(token) > context_chars:
      if value is None:
        raise ServerError("the continuation starts at the first token, which has no log-prob: give a context")
      total += value
      found = True
  if not found:
    raise ServerError("the server's answer holds no token of the continuation")
  return total
