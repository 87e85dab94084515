"""Rendering a chat template sent by a client (only behind server_allow_client_chat_template).

The tokenizer's own renderer would evaluate `{{ 'x' * 100000 * 1000 }}` in full: 100 MB of text built while holding
the interpreter lock, which stalls every other request, /health included, however short the time budget. Here the
sandbox refuses any repetition or power whose result would pass the prompt's size bound before computing it, and
output stops as soon as it passes that bound.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

_SIZED = (str, list, tuple)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
  intercepted_binops = frozenset({"*", "**"})

  def __init__(self, max_chars: int):
    super().__init__(trim_blocks=True, lstrip_blocks=True)
    self.max_chars = max_chars

  def call_binop(self, context, op: str, left: Any, right: Any) -> Any:
    if op == "*":
      for seq, count in ((left, right), (right, left)):
        if isinstance(seq, _SIZED) and isinstance(count, int) and len(seq) * count > self.max_chars:
          raise SecurityError(f"the template repeats a value past {self.max_chars} characters")
      return operator.mul(left, right)
    if isinstance(left, int) and isinstance(right, int) and abs(right) > 64:
      raise SecurityError("the template raises a number to a power above 64")
    return super().call_binop(context, op, left, right)


def _raise(message: str) -> None:
  raise TemplateError(message)


def render(template: str, messages: Sequence[Mapping[str, Any]], max_chars: int, **variables: Any) -> str:
  """The template's text for `messages`; TemplateError (SecurityError included) for a refused template, ValueError
  once the text passes `max_chars`."""
  environment = _BoundedEnvironment(max_chars)
  environment.globals["raise_exception"] = _raise
  pieces, size = [], 0
  for piece in environment.from_string(template).generate(messages=list(messages), **variables):
    size += len(piece)
    if size > max_chars:
      raise ValueError(f"the rendered chat template passes {max_chars} characters")
    pieces.append(piece)
  return "".join(pieces)
