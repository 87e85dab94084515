"""Request schemas of the OpenAI endpoints we serve, and the builders of their JSON responses.

Unknown request fields are rejected (as OpenAI does) rather than silently ignored. Beyond OpenAI we accept vLLM's
`top_k`, `min_p` and (chat) `chat_template_kwargs`, which map directly onto the engine's sampler and the template.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

Prompt = Union[str, list[str], list[int], list[list[int]]]


class _Request(BaseModel):
  # No NaN or infinity in any number: they would pass the range checks below and reach the sampler.
  model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Request):
  include_usage: bool = False


class _SamplingFields(_Request):
  model: str
  temperature: float | None = Field(default=None, ge=0.0, le=2.0)
  top_p: float | None = Field(default=None, gt=0.0, le=1.0)
  top_k: int | None = Field(default=None, ge=-1, le=2**63 - 1)  # -1/0: off; beyond the vocabulary: every token
  min_p: float | None = Field(default=None, ge=0.0, le=1.0)
  n: int | None = Field(default=None, ge=1, le=2**63 - 1)
  stream: bool | None = False
  stream_options: StreamOptions | None = None
  stop: str | list[str] | None = None
  presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
  frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
  logit_bias: dict[str, float] | None = None
  seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # negative: random; 64-bit: folded
  user: str | None = None


class CompletionRequest(_SamplingFields):
  prompt: Prompt
  max_tokens: int | None = Field(default=16, ge=0, le=2**63 - 1)
  echo: bool | None = False
  logprobs: int | None = Field(default=None, ge=0, le=2**63 - 1)
  best_of: int | None = Field(default=None, ge=1, le=2**63 - 1)
  suffix: str | None = None


class TextPart(_Request):
  type: Literal["text"]
  text: str


class ChatMessage(BaseModel):
  # Extra keys (name, tool_call_id, ...) are passed on to the chat template, which may use them.
  model_config = ConfigDict(extra="allow")
  role: Literal["system", "developer", "user", "assistant", "tool"]
  content: str | list[TextPart] | None = None


class ChatCompletionRequest(_SamplingFields):
  messages: list[ChatMessage] = Field(min_length=1)
  max_tokens: int | None = Field(default=None, ge=0, le=2**63 - 1)
  max_completion_tokens: int | None = Field(default=None, ge=0, le=2**63 - 1)
  logprobs: bool | None = False
  top_logprobs: int | None = Field(default=None, ge=0, le=2**63 - 1)
  chat_template_kwargs: dict[str, Any] | None = None
  tools: list[dict[str, Any]] | None = None
  tool_choice: str | dict[str, Any] | None = None
  response_format: dict[str, Any] | None = None


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
  return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request_id: str, created: int, model: str, choices: list[dict], usage_: dict | None) -> dict:
  body = {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
  if usage_ is not None:
    body["usage"] = usage_
  return body


def chat_body(request_id: str, created: int, model: str, choices: list[dict], usage_: dict | None,
              chunk: bool = False) -> dict:
  body = {"id": request_id, "object": "chat.completion.chunk" if chunk else "chat.completion", "created": created,
          "model": model, "choices": choices}
  if usage_ is not None or not chunk:
    body["usage"] = usage_
  return body


def model_card(model_id: str, created: int, max_context: int) -> dict[str, Any]:
  return {"id": model_id, "object": "model", "created": created, "owned_by": "maxtext", "max_model_len": max_context}
