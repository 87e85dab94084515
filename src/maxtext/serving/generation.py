"""One choice being generated: text so far (stop strings applied), tokens used, why it ended."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from maxtext.serving.served_model import ServedModel
from maxtext.serving.text_stream import TextStream


class GeneratedChoice:

  def __init__(self, model: ServedModel, stop: Sequence[str]):
    self.text = TextStream(model.tokenizer, stop)
    self.completion_tokens = 0
    self.finish_reason: str | None = None
    self._end_ids = frozenset(model.end_token_ids)

  @property
  def done(self) -> bool:
    return self.finish_reason is not None

  def take(self, event: Any) -> tuple[str, bool]:
    """Consume one engine TokenEvent; returns (text now safe to show, whether the token belongs to the output).

    The end-of-text token the engine stops on counts as generated but is not part of the text or logprobs."""
    if self.done:
      return "", False
    self.completion_tokens += 1
    is_end = event.finish_reason == "stop" and event.token_id in self._end_ids
    new_text = "" if is_end else self.text.add(event.token_id)
    if self.text.stopped:
      self.finish_reason = "stop"
    elif event.finish_reason is not None:
      self.finish_reason = event.finish_reason
    if self.done:
      new_text += self.text.finish()
    return new_text, not is_end


def sse(data: dict[str, Any] | str) -> str:
  """One server-sent event."""
  return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
