"""A chat answer's text -> OpenAI's message parts, as it streams: Qwen3's thinking (`<think>...</think>`) becomes
`reasoning_content`, each `<tool_call>{"name", "arguments"}</tool_call>` an OpenAI tool call, the rest `content`.

Text that could still be the start of a tag is held back until the next piece decides, so a stream never shows a
partial tag. A tool call whose body is not a JSON object with a name is passed on as content, unchanged.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

THINK, END_THINK = "<think>", "</think>"
TOOL, END_TOOL = "<tool_call>", "</tool_call>"


def _partial_tag(text: str, tags: tuple[str, ...]) -> int:
  """Length of the longest tail of `text` that is a proper prefix of one of `tags`."""
  best = 0
  for tag in tags:
    for k in range(min(len(tag) - 1, len(text)), best, -1):
      if text.endswith(tag[:k]):
        best = k
        break
  return best


class ChatOutput:
  """feed(text) / finish() -> [(kind, value)]: ("reasoning", str), ("content", str) or ("tool_call", dict)."""

  def __init__(self, thinking: bool, tools: bool, started_thinking: bool = False):
    # started_thinking: the prompt already opened <think> (templates that start the answer inside the thinking).
    self.thinking, self.tools = thinking, tools
    self.state = "reasoning" if started_thinking else "content"
    self._buffer = ""
    self._seen_content = False  # <think> only counts before any content
    self.tool_calls = 0
    self._reasoned = False  # some reasoning text was handed out

  def feed(self, text: str) -> list[tuple[str, Any]]:
    self._buffer += text
    out: list[tuple[str, Any]] = []
    while True:
      if self.state == "reasoning":
        end = self._buffer.find(END_THINK)
        if end < 0:
          break
        self._emit(out, "reasoning", self._buffer[:end])
        self._buffer = self._buffer[end + len(END_THINK):].lstrip("\n")
        self.state = "content"
      elif self.state == "tool":
        end = self._buffer.find(END_TOOL)
        if end < 0:
          break
        out.append(self._tool_call(self._buffer[:end]))
        self._buffer = self._buffer[end + len(END_TOOL):]
        self.state = "content"
      else:
        opening = self._next_opening()
        if opening is None:
          break
        at, tag = opening
        self._emit(out, "content", self._buffer[:at])
        self._buffer = self._buffer[at + len(tag):]
        self.state = "reasoning" if tag == THINK else "tool"
    keep = _partial_tag(self._buffer, self._watched())
    if self.state != "tool" and len(self._buffer) > keep:
      self._emit(out, self.state, self._buffer[: len(self._buffer) - keep])
      self._buffer = self._buffer[len(self._buffer) - keep:]
    return out

  def finish(self) -> list[tuple[str, Any]]:
    """No more text: what is held back, an unclosed tool call as plain content."""
    out: list[tuple[str, Any]] = []
    rest, self._buffer = self._buffer, ""
    if self.state == "tool":
      rest = TOOL + rest
      self.state = "content"
    self._emit(out, self.state, rest)
    return out

  # ---- helpers ----
  def _watched(self) -> tuple[str, ...]:
    if self.state == "reasoning":
      return (END_THINK,)
    tags = (TOOL,) if self.tools else ()
    return tags + ((THINK,) if self.thinking and not self._seen_content else ())

  def _next_opening(self) -> tuple[int, str] | None:
    found = [(self._buffer.find(tag), tag) for tag in self._watched()]
    found = [(at, tag) for at, tag in found if at >= 0]
    if not found:
      return None
    at, tag = min(found)
    if tag == THINK and self._buffer[:at].strip():
      return None if not self.tools else self._tool_only()
    return at, tag

  def _tool_only(self) -> tuple[int, str] | None:
    at = self._buffer.find(TOOL)
    return (at, TOOL) if at >= 0 else None

  def _emit(self, out: list, kind: str, text: str) -> None:
    if kind == "reasoning" and not any(k == "reasoning" for k, _ in out) and not self._reasoned:
      text = text.lstrip("\n")  # the line break after <think>
    if not text:
      return
    if kind == "reasoning":
      self._reasoned = True
    if kind == "content":
      if not self._seen_content:
        text = text.lstrip("\n")  # the blank lines between the thinking and the answer
        if not text.strip():
          return
      self._seen_content = True
    out.append((kind, text))

  def _tool_call(self, body: str) -> tuple[str, Any]:
    try:
      call = json.loads(body)
    except json.JSONDecodeError:
      call = None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
      return ("content", TOOL + body + END_TOOL)
    arguments = call.get("arguments", {})
    self.tool_calls += 1
    return ("tool_call", {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": call["name"], "arguments": arguments if isinstance(arguments, str)
                                       else json.dumps(arguments, ensure_ascii=False)}})


def parse(text: str, thinking: bool, tools: bool, started_thinking: bool = False) -> dict[str, Any]:
  """A whole answer -> {"content", "reasoning_content"?, "tool_calls"?} (content None when only tool calls)."""
  parser = ChatOutput(thinking, tools, started_thinking)
  parts = parser.feed(text) + parser.finish()
  content = "".join(v for k, v in parts if k == "content")
  reasoning = "".join(v for k, v in parts if k == "reasoning")
  calls = [v for k, v in parts if k == "tool_call"]
  message: dict[str, Any] = {"content": content if content or not calls else None}
  if reasoning:
    message["reasoning_content"] = reasoning.strip("\n")
  if calls:
    message["tool_calls"] = calls
  return message
