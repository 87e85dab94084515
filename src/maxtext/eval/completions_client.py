"""Log-likelihoods of continuations through an OpenAI-compatible /v1/completions endpoint (ours or any other).

One request per context: the prompts `context + continuation` for every continuation, with echo=true,
max_tokens=0 and logprobs=0, so the server scores them without generating.

Where the server tokenizes over HTTP (`POST /tokenize`, as ours and vLLM do), the prompts go as token ids split
as lm-eval splits them: the whole text's tokens, of which the first len(tokens(context)) are the context (the
context's trailing spaces moved to the continuation first); the score is the sum of the log-probs of the rest.
That gives lm-eval's numbers exactly, also where a token spans the context/continuation border or splits a UTF-8
character. Other servers get text prompts, the continuation's tokens found by their text offsets (approximate
where a token splits a character: its decoded string is then U+FFFD, whose length is not the bytes it covers)."""

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
    self.tokenizes = self._has_tokenize()

  def _request(self, path: str, body: dict[str, Any] | None = None, root: str | None = None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    root = self.root if root is None else root
    request = urllib.request.Request(root + path, data=data, headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(request, timeout=self.timeout) as response:
        return json.loads(response.read())
    except urllib.error.HTTPError as e:
      try:
        message = json.loads(e.read())["error"]["message"]
      except (ValueError, KeyError, TypeError):
        message = e.reason
      raise ServerError(f"{root}{path} answered {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
      raise ServerError(f"cannot reach the server at {self.root}: {getattr(e, 'reason', e)}") from None

  def _first_model(self) -> str:
    models = self._request("/models").get("data") or []
    if not models:
      raise ServerError(f"{self.root}/models lists no model")
    return models[0]["id"]

  def _has_tokenize(self) -> bool:
    try:
      self.tokenize("a")
    except ServerError:
      return False
    return True

  def tokenize(self, text: str) -> list[int]:
    """The server's token ids of `text`, no special tokens added (the /tokenize route beside /v1)."""
    return self._request("/tokenize", {"prompt": text, "add_special_tokens": False},
                         root=self.root.removesuffix("/v1"))["tokens"]

  def __call__(self, context: str, continuations: Sequence[str]) -> list[float]:
    if self.tokenizes:
      pairs = [split_pair(context, c, self.tokenize) for c in continuations]
      prompts: list = [whole for whole, _ in pairs]
    else:
      prompts = [context + c for c in continuations]
    body = {"model": self.model, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 0,
            "temperature": 0.0}
    choices = sorted(self._request("/completions", body)["choices"], key=lambda c: c["index"])
    if len(choices) != len(continuations):
      raise ServerError(f"asked to score {len(continuations)} prompts, got {len(choices)} choices")
    if self.tokenizes:
      return [sum_after(choice["logprobs"]["token_logprobs"], context_tokens)
              for choice, (_, context_tokens) in zip(choices, pairs)]
    return [continuation_logprob(choice["logprobs"], len(context)) for choice in choices]


def split_pair(context: str, continuation: str, tokenize) -> tuple[list[int], int]:
  """(token ids of the whole text, how many of them are the context), as lm-eval's _encode_pair."""
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole = tokenize(context + continuation)
  context_tokens = len(tokenize(context))
  if not 0 < context_tokens < len(whole):
    raise ServerError("the context or the continuation has no token of its own: give both some text")
  return whole, context_tokens


def sum_after(token_logprobs: Sequence[float | None], context_tokens: int) -> float:
  values = token_logprobs[context_tokens:]
  if not values or any(v is None for v in values):
    raise ServerError("the server's answer holds no log-prob for the continuation's tokens")
  return float(sum(values))


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
