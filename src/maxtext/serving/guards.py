"""ASGI middleware in front of every route: the API key, the request body size, and the request counters.

Pure ASGI rather than FastAPI dependencies so they act before the body is read or parsed: an oversized body is
refused by its Content-Length (or as soon as the bytes received pass the limit), never buffered whole.
"""

from __future__ import annotations

import collections
import hmac
import json
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException

from maxtext.serving import errors

_OPEN_PATHS = frozenset({"/health"})  # answered without the API key (load balancers' probes)


async def _answer(send, error: errors.APIError, headers: tuple = ()) -> None:
  body = json.dumps(error.body()).encode()
  await send({"type": "http.response.start", "status": error.status,
              "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                          *headers]})
  await send({"type": "http.response.body", "body": body})


def _too_large(limit: int) -> errors.APIError:
  return errors.APIError(413, f"the request body is larger than server_max_body_bytes ({limit} bytes)",
                         code="request_too_large")


class Guards:
  """Wraps the app: 401 without the right Bearer key (when one is set), 413 past the body limit, and counts
  responses by status for /metrics."""

  def __init__(self, app: Any, api_key: str = "", max_body_bytes: int = 8 << 20):
    self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
    self.responses: collections.Counter[int] = collections.Counter()  # status code -> responses

  async def __call__(self, scope, receive, send) -> None:
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    headers = dict(scope.get("headers") or [])

    async def counted_send(message):
      if message["type"] == "http.response.start":
        self.responses[message["status"]] += 1
      await send(message)

    if self.api_key and scope["path"] not in _OPEN_PATHS and not self._authorised(headers):
      await _answer(counted_send, errors.APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                                  code="invalid_api_key"), ((b"www-authenticate", b"Bearer"),))
      return
    length = headers.get(b"content-length")
    if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
      await _answer(counted_send, _too_large(self.max_body_bytes))
      return
    received = 0

    async def limited_receive():
      nonlocal received
      message = await receive()
      if message["type"] == "http.request":
        received += len(message.get("body", b""))
        if received > self.max_body_bytes:
          # FastAPI passes an HTTPException raised while reading the body on to the app's handlers (errors.py).
          raise StarletteHTTPException(413, _too_large(self.max_body_bytes).message)
      return message

    await self.app(scope, limited_receive, counted_send)

  def _authorised(self, headers: dict[bytes, bytes]) -> bool:
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())
