"""Per-token log-probabilities in the completions API's shape (tokens, token_logprobs, top_logprobs,
text_offset) and the chat API's (content: [{token, logprob, bytes, top_logprobs}])."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from maxtext.serving.served_model import ServedModel, logprob_value


class CompletionLogprobs:
  """Grows token by token; `body(since)` gives the entries from `since` on (a stream sends them in pieces).

  text_offset counts characters of the decoded token strings from `offset` (the echoed prompt's length when
  the prompt is echoed): exact for whole-character tokens, approximate where a token splits a character."""

  def __init__(self, model: ServedModel, offset: int = 0):
    self._model = model
    self.tokens: list[str] = []
    self.token_logprobs: list[float | None] = []
    self.top_logprobs: list[dict[str, float] | None] = []
    self.text_offset: list[int] = []
    self.offset = offset

  def add(self, token_ids: Sequence[int], logprobs: Sequence[float],
          alternatives: Sequence[Sequence[tuple[int, float]] | None]) -> None:
    strings = self._model.token_strings(token_ids)
    for text, logprob, alts in zip(strings, logprobs, alternatives):
      self.tokens.append(text)
      self.token_logprobs.append(logprob_value(logprob))
      self.top_logprobs.append(None if alts is None else self._alternatives(alts))
      self.text_offset.append(self.offset)
      self.offset += len(text)

  def _alternatives(self, alts: Sequence[tuple[int, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for text, (_, logprob) in zip(self._model.token_strings([t for t, _ in alts]), alts):
      out.setdefault(text, float(logprob))  # two ids may decode alike (split characters): keep the likelier
    return out

  def __len__(self) -> int:
    return len(self.tokens)

  def body(self, since: int = 0) -> dict[str, Any]:
    return {"tokens": self.tokens[since:], "token_logprobs": self.token_logprobs[since:],
            "top_logprobs": self.top_logprobs[since:], "text_offset": self.text_offset[since:]}


def chat_logprob_entries(model: ServedModel, token_id: int, logprob: float,
                         alternatives: Sequence[tuple[int, float]], top_n: int) -> dict[str, Any]:
  def entry(text: str, value: float) -> dict[str, Any]:
    return {"token": text, "logprob": float(value), "bytes": list(text.encode("utf-8"))}

  strings = model.token_strings([token_id, *(t for t, _ in alternatives[:top_n])])
  chosen = entry(strings[0], logprob)
  chosen["top_logprobs"] = [entry(text, value) for text, (_, value) in zip(strings[1:], alternatives[:top_n])]
  return chosen
