"""POST /v1/chat/completions: messages -> the tokenizer's chat template -> generate; streaming as
`chat.completion.chunk` server-sent events ending with `data: [DONE]`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from maxtext.serving import client_template, errors
from maxtext.serving.chat_output import THINK, ChatOutput, parse
from maxtext.serving.generation import GeneratedChoice, sse
from maxtext.serving.logprobs import chat_logprob_entries
from maxtext.serving.protocol import ChatCompletionRequest, chat_body, new_id, now, usage
from maxtext.serving.served_model import MAX_CHARS_PER_TOKEN, MAX_LOGPROBS, ServedModel, check_sampling


def _template_messages(request: ChatCompletionRequest) -> list[dict[str, Any]]:
  messages = []
  for message in request.messages:
    item = message.model_dump(exclude_none=True)
    if isinstance(message.content, list):
      item["content"] = "".join(part.text for part in message.content)
    for call in item.get("tool_calls") or []:
      # OpenAI sends a call's arguments as a JSON string; Qwen's template writes them out as an object.
      function = call.get("function") if isinstance(call, dict) else None
      if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
          function["arguments"] = json.loads(function["arguments"])
        except json.JSONDecodeError:
          pass
    messages.append(item)
  return messages


def _uses_tools(request: ChatCompletionRequest) -> bool:
  return bool(request.tools) and request.tool_choice != "none"


# chat_template_kwargs keys that would change what apply_chat_template returns rather than what the template sees.
_RESERVED_TEMPLATE_KWARGS = frozenset({"tokenize", "return_dict", "return_tensors", "padding", "truncation",
                                       "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask",
                                       "add_generation_prompt", "conversation"})


def _template_kwargs(request: ChatCompletionRequest, model: ServedModel) -> dict[str, Any]:
  kwargs = dict(request.chat_template_kwargs or {})
  if "chat_template" in kwargs and not model.allow_client_chat_template:
    raise errors.bad_request("clients may not replace the chat template (the server's"
                             " server_allow_client_chat_template is off)", param="chat_template_kwargs.chat_template")
  reserved = sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys())
  if reserved:
    raise errors.bad_request(f"chat_template_kwargs may not set '{reserved[0]}'",
                             param=f"chat_template_kwargs.{reserved[0]}")
  return kwargs


async def prompt_ids(request: ChatCompletionRequest, model: ServedModel) -> tuple[list[int], str]:
  """The chat template applied to the messages (and tools), ending with the assistant turn's header: (token ids,
  text). Rendered and tokenised off the event loop within the time budget; the text is measured before tokenising."""
  kwargs = _template_kwargs(request, model)
  if _uses_tools(request):
    kwargs["tools"] = request.tools
  messages = _template_messages(request)

  def work() -> tuple[list[int], str]:
    try:
      if "chat_template" in kwargs:  # a client's template: size-bounded rendering, never the tokenizer's renderer
        variables = {k: v for k, v in kwargs.items() if k != "chat_template"}
        tokenizer = model.tokenizer
        text = client_template.render(
            kwargs["chat_template"], messages, MAX_CHARS_PER_TOKEN * model.max_context, add_generation_prompt=True,
            bos_token=getattr(tokenizer, "bos_token", None) or "", eos_token=getattr(tokenizer, "eos_token", None) or "",
            **variables)
      else:
        text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    except Exception as e:  # pylint: disable=broad-except  # jinja raises for messages the template refuses
      raise errors.bad_request(f"the chat template rejected the messages: {e}", param="messages") from None
    model.check_text(text, "messages")
    ids = model.encode(text)
    model.check_tokens(ids, "messages")
    return ids, text

  return await model.off_loop(work, "rendering and tokenizing 'messages'")


def _check(request: ChatCompletionRequest) -> None:
  if request.tool_choice not in (None, "auto", "none"):
    raise errors.bad_request("tool_choice may be 'auto' or 'none' (a forced or required call is not supported)",
                             param="tool_choice")
  if request.response_format and request.response_format.get("type", "text") != "text":
    raise errors.bad_request("only response_format type 'text' is supported", param="response_format")
  if request.top_logprobs is not None:
    if not request.logprobs:
      raise errors.bad_request("top_logprobs requires logprobs=true", param="top_logprobs")
    if request.top_logprobs > MAX_LOGPROBS:
      raise errors.bad_request(f"top_logprobs must be at most {MAX_LOGPROBS}, got {request.top_logprobs}",
                               param="top_logprobs")


async def create(request: ChatCompletionRequest, model: ServedModel) -> dict | StreamingResponse:
  model.check_model(request.model)
  stop = check_sampling(request)
  _check(request)
  n = request.n or 1
  model.check_prompt_count(n, "n")
  ids, text = await prompt_ids(request, model)
  # Qwen3 thinks inside <think>...</think> (some templates open it in the prompt); tool calls come as <tool_call>.
  thinking = model.tokenizer.convert_tokens_to_ids(THINK) != getattr(model.tokenizer, "unk_token_id", None)
  started = thinking and text.rstrip().endswith(THINK)
  shape = (thinking, _uses_tools(request), started)
  requested = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
  # Without a limit the answer may use whatever the context has left, but at least one token.
  max_tokens = requested if requested is not None else max(1, model.max_context - len(ids))
  model.check_length(ids, max_tokens, "messages")
  top_n = (request.top_logprobs or 0) if request.logprobs else 0
  params = [model.sampling_params(request, max_tokens, top_n, choice=j) for j in range(n)]
  choices = [GeneratedChoice(model, stop) for _ in range(n)]
  meta = (new_id("chatcmpl"), now(), model.model_id)
  deltas = _deltas(model, choices, ids, params, bool(request.logprobs), top_n)
  if request.stream:
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return StreamingResponse(_stream(deltas, choices, len(ids), meta, include_usage, shape),
                             media_type="text/event-stream")
  content: list[list[str]] = [[] for _ in choices]
  logprobs: list[list[dict]] = [[] for _ in choices]
  async for index, text, entry in deltas:
    content[index].append(text)
    if entry is not None:
      logprobs[index].append(entry)
  messages = [{"role": "assistant", **parse("".join(content[j]), *shape)} for j in range(n)]
  bodies = [{"index": j, "message": messages[j], "logprobs": {"content": logprobs[j]} if request.logprobs else None,
             "finish_reason": _finish_reason(choice, "tool_calls" in messages[j])} for j, choice in enumerate(choices)]
  return chat_body(*meta, bodies, usage(len(ids), sum(c.completion_tokens for c in choices)))


async def _deltas(model: ServedModel, choices: list[GeneratedChoice], ids: list[int], params: list[Any],
                  logprobs: bool, top_n: int) -> AsyncIterator[tuple[int, str, dict | None]]:
  """(choice index, new text, logprob entry of the token or None) per generated token."""
  if params[0].max_tokens == 0:
    for choice in choices:
      choice.finish_reason = "length"
    return
  async with contextlib.aclosing(model.batcher.generate([ids] * len(choices), params)) as events:
    async for event in events:
      choice = choices[event.request]
      if choice.done:
        continue
      text, counts = choice.take(event)
      entry = None
      if logprobs and counts:
        entry = chat_logprob_entries(model, event.token_id, event.logprob, event.top_logprobs, top_n)
      yield event.request, text, entry
      if all(c.done for c in choices):
        break


def _finish_reason(choice: GeneratedChoice, called_tools: bool) -> str | None:
  return "tool_calls" if called_tools and choice.finish_reason == "stop" else choice.finish_reason


def _delta(kind: str, value: Any, calls_so_far: int) -> dict[str, Any]:
  if kind == "reasoning":
    return {"reasoning_content": value}
  if kind == "tool_call":
    return {"tool_calls": [{"index": calls_so_far, **value}]}
  return {"content": value}


async def _stream(deltas: AsyncIterator[tuple[int, str, dict | None]], choices: list[GeneratedChoice],
                  prompt_tokens: int, meta: tuple, include_usage: bool, shape: tuple) -> AsyncIterator[str]:
  def chunk(index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> str:
    return sse(chat_body(*meta, [{"index": index, "delta": delta, "logprobs": logprobs,
                                  "finish_reason": finish_reason}], None, chunk=True))

  parsers = [ChatOutput(*shape) for _ in choices]
  calls = [0] * len(choices)

  def parts(index: int, new: list, entry: dict | None) -> list[str]:
    """The chunks of one choice's newly parsed parts; a token's logprobs ride on its first chunk (or an empty one)."""
    out, logprobs = [], None if entry is None else {"content": [entry]}
    for kind, value in new:
      out.append(chunk(index, _delta(kind, value, calls[index]), logprobs))
      calls[index] += kind == "tool_call"
      logprobs = None
    if logprobs is not None:
      out.append(chunk(index, {"content": ""}, logprobs))
    return out

  def close(index: int) -> list[str]:
    out = parts(index, parsers[index].finish(), None)
    return out + [chunk(index, {}, finish_reason=_finish_reason(choices[index], calls[index] > 0))]

  try:
    for index in range(len(choices)):
      yield chunk(index, {"role": "assistant", "content": ""})
    finished = set()
    async for index, text, entry in deltas:
      for event in parts(index, parsers[index].feed(text), entry):
        yield event
      if choices[index].done and index not in finished:
        finished.add(index)
        for event in close(index):
          yield event
    for index in range(len(choices)):
      if index not in finished:
        for event in close(index):
          yield event
    if include_usage:
      yield sse(chat_body(*meta, [], usage(prompt_tokens, sum(c.completion_tokens for c in choices)), chunk=True))
  except errors.APIError as e:
    yield sse(e.body())
  except Exception as e:  # pylint: disable=broad-except
    yield sse(errors.APIError(500, f"{type(e).__name__}: {e}", error_type="server_error").body())
  yield sse("[DONE]")
