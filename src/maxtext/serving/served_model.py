"""What the endpoints share: the batched engine, the tokenizer, the model's name and limits, and the request
checks common to completions and chat (model name, context length, sampling parameters)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from maxtext.serving import errors
from maxtext.serving.batcher import Batcher
from maxtext.serving.protocol import now

# OpenAI's completions API allows at most 5; like vLLM we allow up to 20 alternatives per token.
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1024
# Tokens that end a generation when the model emits them: the base model's end of text and the chat turn end.
END_TOKENS = ("<|endoftext|>", "<|im_end|>")
# A prompt string longer than this many characters per context token cannot fit (no real text averages more per
# token): refused before the tokenizer spends seconds on it.
MAX_CHARS_PER_TOKEN = 32
_T = TypeVar("_T")


@dataclasses.dataclass
class ServedModel:
  batcher: Batcher
  tokenizer: Any
  model_id: str
  max_context: int
  vocab_size: int
  sampling_params_type: type  # maxtext.inference.sampling.SamplingParams
  created: int = dataclasses.field(default_factory=now)
  max_prompts_per_request: int = 256
  tokenize_timeout_s: float = 10.0
  allow_client_chat_template: bool = False

  def __post_init__(self) -> None:
    # Tokenising and template rendering run here, never on the event loop: a huge prompt must not freeze /health.
    self._text_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="tokenize")
    ids = {self.tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS}
    if self.tokenizer.eos_token_id is not None:
      ids.add(self.tokenizer.eos_token_id)
    unk = getattr(self.tokenizer, "unk_token_id", None)
    self.end_token_ids = tuple(sorted(i for i in ids if isinstance(i, int) and i != unk and 0 <= i < self.vocab_size))

  # ---- checks ----
  def check_model(self, model: str) -> None:
    if model != self.model_id:
      raise errors.model_not_found(model)

  def check_tokens(self, prompt: Sequence[int], param: str) -> None:
    if not prompt:
      raise errors.bad_request(f"'{param}' is empty: give at least one token", param=param)
    bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
    if bad is not None:
      raise errors.bad_request(f"token id {bad} in '{param}' is outside the vocabulary [0, {self.vocab_size})",
                               param=param)

  def check_length(self, prompt: Sequence[int], max_tokens: int, param: str) -> None:
    if len(prompt) + max_tokens > self.max_context:
      raise errors.context_length_exceeded(self.max_context, len(prompt), max_tokens, param)

  def check_text(self, text: str, param: str) -> None:
    limit = MAX_CHARS_PER_TOKEN * self.max_context
    if len(text) > limit:
      raise errors.bad_request(f"'{param}' has {len(text)} characters, more than {limit} ({MAX_CHARS_PER_TOKEN} per"
                               f" token of the {self.max_context}-token context) could ever fit", param=param)

  def check_prompt_count(self, count: int, param: str) -> None:
    if count > self.max_prompts_per_request:
      raise errors.bad_request(f"'{param}' holds {count} prompts; at most {self.max_prompts_per_request} per"
                               f" request (server_max_prompts_per_request)", param=param)

  # ---- text work off the event loop ----
  async def off_loop(self, work: Callable[[], _T], what: str) -> _T:
    """Run `work` on the text threads within the tokenize time budget (a 400 past it)."""
    future = asyncio.get_running_loop().run_in_executor(self._text_pool, work)
    try:
      return await asyncio.wait_for(future, self.tokenize_timeout_s)
    except asyncio.TimeoutError:
      raise errors.bad_request(f"{what} took longer than server_tokenize_timeout_s ({self.tokenize_timeout_s:g} s)",
                               code="tokenize_timeout") from None

  async def encode_async(self, texts: Sequence[str], param: str) -> list[list[int]]:
    for text in texts:
      self.check_text(text, param)
    return await self.off_loop(lambda: [self.encode(t) for t in texts], f"tokenizing '{param}'")

  # ---- helpers ----
  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=False))

  def token_strings(self, token_ids: Sequence[int]) -> list[str]:
    return list(self.tokenizer.batch_decode([[t] for t in token_ids]))

  def sampling_params(self, request: Any, max_tokens: int, logprobs: int, choice: int = 0) -> Any:
    """The engine's SamplingParams for an OpenAI request (after `check_sampling`); `choice` (of n) gets its own
    stream: seed + choice when seeded."""
    # Negative seeds (clients send -1) mean "random", like no seed; 64-bit seeds are folded by the engine.
    seed = random.randrange(2**31) if request.seed is None or request.seed < 0 else request.seed + choice
    try:
      return self.sampling_params_type(
          max_tokens=max_tokens,
          temperature=1.0 if request.temperature is None else request.temperature,
          top_k=min(max(0, request.top_k or 0), self.vocab_size),  # beyond the vocabulary: every token
          top_p=1.0 if request.top_p is None else request.top_p,
          min_p=request.min_p or 0.0,
          presence_penalty=request.presence_penalty or 0.0,
          stop_token_ids=self.end_token_ids,
          seed=seed,
          logprobs=logprobs,
      )
    except ValueError as e:
      raise errors.bad_request(str(e)) from None


def check_sampling(request: Any) -> list[str]:
  """Reject what we cannot honour (one line naming the parameter); returns the stop strings."""
  if request.frequency_penalty:
    raise errors.bad_request("frequency_penalty is not supported (presence_penalty is)", param="frequency_penalty")
  if request.logit_bias:
    raise errors.bad_request("logit_bias is not supported", param="logit_bias")
  stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
  if len(stop) > MAX_STOP_STRINGS:
    raise errors.bad_request(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}", param="stop")
  if any(len(s) > MAX_STOP_CHARS for s in stop):
    raise errors.bad_request(f"a stop string may have at most {MAX_STOP_CHARS} characters", param="stop")
  if request.stream_options is not None and not request.stream:
    raise errors.bad_request("stream_options is only allowed with stream=true", param="stream_options")
  return [s for s in stop if s]


def logprob_value(value: float) -> float | None:
  """JSON has no NaN: the first prompt token (nothing predicts it) gets null, as OpenAI does."""
  return None if value != value else float(value)  # pylint: disable=comparison-with-itself
