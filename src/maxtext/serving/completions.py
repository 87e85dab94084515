"""POST /v1/completions: text or token prompts, echo, logprobs, prompt scoring (max_tokens=0), stop strings,
streaming."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from maxtext.serving import errors
from maxtext.serving.generation import GeneratedChoice, sse
from maxtext.serving.logprobs import CompletionLogprobs
from maxtext.serving.protocol import CompletionRequest, completion_body, new_id, now, usage
from maxtext.serving.served_model import MAX_LOGPROBS, ServedModel, check_sampling


class _Choice(GeneratedChoice):

  def __init__(self, model: ServedModel, index: int, prompt_ids: list[int], prompt_text: str, echo: bool,
               stop: list[str], logprobs: int | None):
    super().__init__(model, stop)
    self.index, self.prompt_ids = index, prompt_ids
    self.echo_text = prompt_text if echo else ""
    self.output = ""
    self.logprobs = CompletionLogprobs(model) if logprobs is not None else None
    self._sent_logprobs = 0

  def add_prompt_scores(self, scores: Any) -> None:
    alternatives = [None, *scores.top_logprobs[1:]]  # nothing predicts the first prompt token
    self.logprobs.add(self.prompt_ids, list(scores.token_logprobs), alternatives)

  def start_completion_offsets(self) -> None:
    if self.logprobs is not None:
      self.logprobs.offset = len(self.echo_text)

  def take_event(self, event: Any) -> str:
    text, counts = self.take(event)
    if counts and self.logprobs is not None:
      self.logprobs.add([event.token_id], [event.logprob], [event.top_logprobs])
    self.output += text
    return text

  def logprobs_since_last(self) -> dict | None:
    if self.logprobs is None:
      return None
    body = self.logprobs.body(self._sent_logprobs)
    self._sent_logprobs = len(self.logprobs)
    return body

  def body(self) -> dict[str, Any]:
    return {"index": self.index, "text": self.echo_text + self.output,
            "logprobs": None if self.logprobs is None else self.logprobs.body(), "finish_reason": self.finish_reason}


async def _prompts(request: CompletionRequest, model: ServedModel) -> list[tuple[list[int], str]]:
  """(token ids, text) per prompt, from a string, strings, a token list or token lists; the text only with echo.
  Counted and measured on the event loop (cheap), tokenised and checked off it (within the time budget)."""
  prompt = request.prompt
  if isinstance(prompt, str):
    items: list = [prompt]
  elif not prompt:
    raise errors.bad_request("'prompt' is an empty list", param="prompt")
  elif isinstance(prompt[0], int):
    items = [prompt]
  else:
    items = list(prompt)
  model.check_prompt_count(len(items), "prompt")
  for item in items:
    if isinstance(item, str):
      model.check_text(item, "prompt")
    elif len(item) > model.max_context:
      raise errors.context_length_exceeded(model.max_context, len(item), 0, "prompt")
  echo = bool(request.echo)

  def work() -> list[tuple[list[int], str]]:
    out = []
    for item in items:
      ids = model.encode(item) if isinstance(item, str) else list(item)
      model.check_tokens(ids, "prompt")
      text = item if isinstance(item, str) else (model.tokenizer.decode(ids) if echo else "")
      out.append((ids, text))
    return out

  return await model.off_loop(work, "tokenizing 'prompt'")


async def create(request: CompletionRequest, model: ServedModel) -> dict | StreamingResponse:
  model.check_model(request.model)
  stop = check_sampling(request)
  if (request.best_of or 1) != 1:
    raise errors.bad_request("only best_of=1 is supported", param="best_of")
  if request.suffix:
    raise errors.bad_request("suffix is not supported", param="suffix")
  if request.logprobs is not None and request.logprobs > MAX_LOGPROBS:
    raise errors.bad_request(f"logprobs must be at most {MAX_LOGPROBS}, got {request.logprobs}", param="logprobs")
  max_tokens = 16 if request.max_tokens is None else request.max_tokens
  n = request.n or 1
  model.check_prompt_count(n, "n")
  prompts = await _prompts(request, model)
  model.check_prompt_count(n * len(prompts), "n")
  for ids, _ in prompts:
    model.check_length(ids, max_tokens, "prompt")
  top_n = request.logprobs or 0
  # n choices per prompt, prompt-major (OpenAI's order: index = prompt * n + sample), each its own rng stream.
  choices = [_Choice(model, i * n + j, ids, text, bool(request.echo), stop, request.logprobs)
             for i, (ids, text) in enumerate(prompts) for j in range(n)]
  params = [model.sampling_params(request, max_tokens, top_n, choice=j) for _ in prompts for j in range(n)]
  score = bool(request.echo) and request.logprobs is not None
  run = _run(model, choices, params, max_tokens, top_n if score else None)
  meta = (new_id("cmpl"), now(), model.model_id)
  if request.stream:
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return StreamingResponse(_stream(run, choices, meta, include_usage), media_type="text/event-stream")
  async for _ in run:
    pass
  prompt_tokens = sum(len(c.prompt_ids) for c in choices)
  return completion_body(*meta, [c.body() for c in choices],
                         usage(prompt_tokens, sum(c.completion_tokens for c in choices)))


async def _run(model: ServedModel, choices: list[_Choice], params: list, max_tokens: int,
               score_top_n: int | None) -> AsyncIterator[tuple[_Choice, str]]:
  """Drive the engine; yields (choice, new text) whenever a choice changes (its prompt echo first).

  score_top_n: score the prompts first (echo with logprobs), with this many alternatives per token."""
  if score_top_n is not None:
    scores = await model.batcher.score([c.prompt_ids for c in choices], score_top_n)
    for choice, prompt_scores in zip(choices, scores):
      choice.add_prompt_scores(prompt_scores)
  for choice in choices:
    choice.start_completion_offsets()
    if choice.echo_text:
      yield choice, choice.echo_text
  if max_tokens == 0:
    for choice in choices:
      choice.finish_reason = "length"
      yield choice, ""
    return
  async with contextlib.aclosing(model.batcher.generate([c.prompt_ids for c in choices], params)) as events:
    async for event in events:
      choice = choices[event.request]
      if choice.done:
        continue
      text = choice.take_event(event)
      yield choice, text
      if all(c.done for c in choices):
        break


async def _stream(run: AsyncIterator[tuple[_Choice, str]], choices: list[_Choice], meta: tuple,
                  include_usage: bool) -> AsyncIterator[str]:
  try:
    async for choice, text in run:
      part = {"index": choice.index, "text": text, "logprobs": choice.logprobs_since_last(),
              "finish_reason": choice.finish_reason}
      yield sse(completion_body(*meta, [part], None))
    if include_usage:
      prompt_tokens = sum(len(c.prompt_ids) for c in choices)
      yield sse(completion_body(*meta, [], usage(prompt_tokens, sum(c.completion_tokens for c in choices))))
  except errors.APIError as e:
    yield sse(e.body())
  except Exception as e:  # pylint: disable=broad-except
    yield sse(errors.APIError(500, f"{type(e).__name__}: {e}", error_type="server_error").body())
  yield sse("[DONE]")
