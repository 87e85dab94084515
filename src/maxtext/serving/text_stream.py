"""Generated token ids -> text, as they come: whole characters only, cut at the first stop string.

Byte-level BPE tokens can end inside a UTF-8 character; such a tail is held until the next token completes it.
Text that could still turn out to be the start of a stop string is held too, so a stream never shows a stop
string's beginning that the final text would not contain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_INCOMPLETE = "\ufffd"


class TextStream:

  def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
    self._tokenizer = tokenizer
    self._stop = tuple(s for s in stop if s)
    self._ids: list[int] = []
    self._undecoded = 0  # ids from here on are not in `text` yet
    self.text = ""
    self._shown = 0  # characters of `text` handed out
    self.stopped = False  # a stop string was found; `text` ends just before it

  def add(self, token_id: int) -> str:
    """Take one generated token; returns the text that is now safe to show."""
    if self.stopped:
      return ""
    self._ids.append(token_id)
    piece = self._tokenizer.decode(self._ids[self._undecoded:], skip_special_tokens=True)
    if piece.endswith(_INCOMPLETE):
      return ""
    self._append(piece)
    return self._release(final=False)

  def finish(self) -> str:
    """No more tokens: the rest of the text, an unfinished character included."""
    if not self.stopped and self._undecoded < len(self._ids):
      self._append(self._tokenizer.decode(self._ids[self._undecoded:], skip_special_tokens=True))
    return self._release(final=True)

  def _append(self, piece: str) -> None:
    self._undecoded = len(self._ids)
    longest = max((len(s) for s in self._stop), default=0)
    search_from = max(0, len(self.text) - longest + 1)
    self.text += piece
    cuts = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
    if cuts:
      self.text = self.text[: min(cuts)]
      self.stopped = True

  def _release(self, final: bool) -> str:
    end = len(self.text) if (final or self.stopped) else len(self.text) - self._stop_prefix_length()
    out = self.text[self._shown:end] if end > self._shown else ""
    self._shown = max(self._shown, end)
    return out

  def _stop_prefix_length(self) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in self._stop:
      for k in range(min(len(stop) - 1, len(self.text)), best, -1):
        if self.text.endswith(stop[:k]):
          best = k
          break
    return best
