"""The inference engine: batched generation with streaming token events, and prompt scoring.

A call pads its prompts (right) to a power-of-two batch and prompt bucket, prefills them in one pass (a prompt
longer than long_prefill_chunk_size in chunks, each attending to the caches the earlier ones filled), then runs
jitted fixed-shape steps (steps.py), each dispatched before the previous step's tokens are read back, so the device
never waits for the host. With `mtp_speculative_decoding`, each step is a speculative round: the MTP head drafts
`mtp_num_draft_tokens`, one forward pass verifies them; greedy requests get exactly greedy's output, sampled ones
tokens distributed exactly as plain sampling's (speculative sampling, speculative.py).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from maxtext import sharding
from maxtext.configs import Config, ConfigError
from maxtext.inference.sampling import MAX_LOGPROBS, BatchSampling, SamplingParams
from maxtext.inference.steps import DecodeSteps, Emitted, Forced
from maxtext.models import params as model_params
from maxtext.models.qwen3_next import Qwen3NextForCausalLM
from maxtext.models.spec import ModelSpec

_logger = logging.getLogger("maxtext.inference")
_MIN_BUCKET = 16
_LOOKAHEAD = 2  # decode calls dispatched ahead of the one whose tokens are being read
_SCORE_LOGITS_BYTES = 2 << 30  # cap on one scoring call's [B, T, V] float32 logits
_INVARIANT_SCORE_ROWS = 8  # rows of every batch-invariant scoring call (fewer where the logits cap says so)


@dataclasses.dataclass(frozen=True)
class TokenEvent:
  request: int  # index into the prompts passed to generate()
  token_id: int
  logprob: float  # log-prob of token_id under the (unmodified, temperature-1) model distribution
  top_logprobs: tuple[tuple[int, float], ...]  # `logprobs` best alternatives, best first
  finish_reason: str | None  # None while running; "stop" (stop token, included as last event) or "length"


@dataclasses.dataclass(frozen=True)
class PromptScores:
  token_logprobs: np.ndarray  # [T] float32; [0] is nan (nothing predicts the first token)
  top_logprobs: list[tuple[tuple[int, float], ...]]  # per position, `top_n` best alternatives ([0] empty)


@functools.cache
def _log_chunked_once(chunk: int) -> None:
  _logger.info("prompts longer than %d tokens are prefilled in chunks of %d (long_prefill_chunk_size)", chunk, chunk)


def _bucket(n: int, floor: int = 1) -> int:
  """The smallest power of two >= max(n, floor): shapes come from few buckets, so few compilations."""
  return max(floor, 1 << max(0, n - 1).bit_length())


class Engine:
  """Holds the model parameters on the devices and the compiled decode functions. Not thread-safe."""

  def __init__(self, config: Config, params: Any = None, devices: Sequence[jax.Device] | None = None):
    """params: a parameter tree in the model's layout (numpy or jax arrays); None loads `load_parameters_path`,
    or initialises randomly (seed init_weights_seed) without one. devices: the mesh's devices (default all)."""
    self.config = config
    self.max_context = config.max_target_length
    self.spec = ModelSpec.from_config(config)
    self.model = Qwen3NextForCausalLM(self.spec)
    if config.ici_context_parallelism * config.dcn_context_parallelism != 1:  # decode steps are a token a row
      raise ConfigError("context parallelism splits training sequences only: set ici_context_parallelism=1 and"
                        " dcn_context_parallelism=1 to decode or serve")
    self.mesh = sharding.make_mesh(sharding.config_parallelism(config), devices)
    self.params = self._place(params)
    self._num_draft = config.mtp_num_draft_tokens if config.mtp_speculative_decoding else 0
    self._steps: dict[tuple[int, int, bool], DecodeSteps] = {}
    self.last_stats: dict[str, float] = {}  # of the latest generate(): steps, tokens, accepted drafts
    # Of the latest generate(), for replay(): the (rows, prompt length) its prompts were padded to, and when it
    # speculated, per request the tokens each call emitted (prefill first); None when it decoded a token a call.
    self.last_shape: tuple[int, int] = (0, 0)
    self.last_rounds: list[list[int]] | None = None

  # ---- parameters ----
  def _place(self, params: Any) -> Any:
    if params is None and self.config.load_parameters_path:
      from maxtext.checkpoint_conversion import orbax_io  # noqa: PLC0415 - orbax only when loading

      # Read first: a damaged checkpoint stops here, before the model is built.
      params = orbax_io.load_params(self.config.load_parameters_path, self.spec)
    abstract = model_params.abstract_variables(self.spec)
    shardings = sharding.logical_sharding(abstract, self.mesh)["params"]
    if params is None:
      _logger.info("no load_parameters_path: random parameters (seed %d)", self.config.init_weights_seed)
      variables, _ = sharding.init_sharded(
          lambda rng: model_params.init_variables(self.spec, rng), abstract, self.mesh,
          jax.random.key(self.config.init_weights_seed),
      )
      return variables["params"]
    params = params.get("params", params) if isinstance(params, dict) else params
    dtype = self.spec.numerics.weight_dtype
    expected = nn.unbox(abstract)["params"]
    if jax.tree.structure(expected) != jax.tree.structure(params):
      raise ValueError("params do not match the model's parameter tree (check scan_layers and the model keys)")
    return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x, dtype), s), params, shardings)

  def _steps_for(self, num_top: int, num_draft: int, greedy_only: bool = False, filtered: bool = True) -> DecodeSteps:
    key = (num_top, num_draft, greedy_only, filtered)
    if key not in self._steps:
      self._steps[key] = DecodeSteps(self.model, self.max_context + self._num_draft, num_top, num_draft, greedy_only,
                                     filtered)
    return self._steps[key]

  def _check_prompts(self, prompts: Sequence[Sequence[int]], extra: Sequence[int]) -> list[list[int]]:
    checked = []
    for index, (prompt, more) in enumerate(zip(prompts, extra)):
      prompt = [int(t) for t in prompt]
      if not prompt:
        raise ValueError(f"prompt {index} is empty")
      if min(prompt) < 0 or max(prompt) >= self.spec.vocab_size:
        raise ValueError(f"prompt {index} has a token id outside the vocabulary [0, {self.spec.vocab_size})")
      if len(prompt) + more > self.max_context:
        raise ValueError(
            f"prompt {index}: {len(prompt)} prompt tokens + {more} new tokens exceed max_target_length"
            f" ({self.max_context})"
        )
      checked.append(prompt)
    return checked

  def _padded(self, prompts: list[list[int]], floor: int, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [batch bucket, length] tokens and the lengths; a prompt longer than `chunk` pads to whole
    chunks (the chunked prefill's unit) rather than to a power of two."""
    batch = _bucket(len(prompts))
    longest = max(map(len, prompts))
    whole_chunks = chunk is not None and longest > chunk
    length = min(-(-longest // chunk) * chunk if whole_chunks else _bucket(longest, floor), self.max_context)
    tokens = np.zeros((batch, length), np.int32)
    lengths = np.ones((batch,), np.int32)  # padding rows: one token
    for row, prompt in enumerate(prompts):
      tokens[row, : len(prompt)] = prompt
      lengths[row] = len(prompt)
    return tokens, lengths

  # ---- generation ----
  def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> Iterator[TokenEvent]:
    """Generate for all prompts together; yields each new token as soon as its step has run."""
    if len(prompts) != len(params):
      raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    prompts = self._check_prompts(prompts, [p.max_tokens for p in params])
    if not prompts or all(p.max_tokens == 0 for p in params):
      return
    # A presence penalty changes p with every accepted token inside a round: those batches decode plainly.
    speculative = self._num_draft > 0 and all(p.presence_penalty == 0 for p in params)
    if self._num_draft and not speculative:
      _logger.info("speculative decoding needs requests without presence penalty: decoding plainly")
    num_top = MAX_LOGPROBS if any(p.logprobs for p in params) else 0
    greedy_only = all(p.greedy for p in params)
    # Without top-k / top-p / min-p, sampling (plain or speculative) needs no sort of the vocabulary.
    filtered = any(p.filtered for p in params)
    steps = self._steps_for(num_top, self._num_draft if speculative else 0, greedy_only, filtered)
    chunk = self.config.long_prefill_chunk_size
    tokens, lengths = self._padded(prompts, max(_MIN_BUCKET, self.config.max_prefill_predict_length), chunk)
    sampling = BatchSampling.of(params, tokens.shape[0])
    remaining = [p.max_tokens for p in params]
    stops = [frozenset(p.stop_token_ids) for p in params]
    stats = {"steps": 0, "tokens": 0, "drafted": 0, "accepted": 0}
    self.last_stats = stats
    self.last_shape = tokens.shape
    rounds = [[] for _ in prompts]
    self.last_rounds = rounds if speculative else None

    # Generation passes "nothing forced" to the very calls replay() forces tokens through: one compiled program each.
    unforced = Forced.none(tokens.shape[0])
    state, emitted = self._prefill(steps, self.params, tokens, lengths, sampling, chunk, unforced)
    unforced_round = Forced.none(tokens.shape[0], self._num_draft + 1)
    in_flight = collections.deque([emitted])  # dispatched calls whose tokens are not read back yet
    step = 1
    while True:
      # Keep up to _LOOKAHEAD calls queued ahead of the one being read, so the device never waits for the host's
      # readback and bookkeeping. Each queued call emits >= 1 token per running row, so no call is dispatched
      # that cannot be needed (a stop token can still end a row early: those outputs are dropped).
      while len(in_flight) <= _LOOKAHEAD and max(remaining) - len(in_flight) > 0:
        with sharding.activate(self.mesh):
          if speculative and greedy_only:
            state, following = steps.speculate(self.params, state)
          elif speculative:
            state, following = steps.speculate_sampled(self.params, state, sampling, np.int32(step), unforced_round)
          else:
            state, following = steps.step(self.params, state, sampling, np.int32(step), unforced)
        in_flight.append(following)
        step += 1
      if not in_flight:
        return
      yield from self._events(in_flight.popleft(), params, remaining, stops, stats, speculative, rounds)
      if all(r <= 0 for r in remaining):
        return
      stats["steps"] += 1

  def _prefill(self, steps: DecodeSteps, params: Any, tokens: np.ndarray, lengths: np.ndarray,
               sampling: BatchSampling, chunk: int, forced: Forced) -> tuple[Any, Emitted]:
    """The prompts into the caches and the first new token (sampled, or forced), in one pass or in chunks."""
    with sharding.activate(self.mesh):
      if tokens.shape[1] > chunk:
        return self._chunked_prefill(steps, tokens, lengths, sampling, chunk, params=params, forced=forced)
      return steps.prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), sampling, forced)

  def _chunked_prefill(self, steps: DecodeSteps, tokens: np.ndarray, lengths: np.ndarray, sampling: BatchSampling,
                       chunk: int, *, params: Any = None, forced: Forced | None = None) -> tuple[Any, Emitted]:
    """Prefill in chunks of `chunk` tokens, each attending to the caches the earlier ones filled: no buffer grows
    with the prompt squared (a one-shot prefill's attention does, off the flash kernels). At most two compiled
    chunk shapes: `chunk` and the tail up to max_target_length."""
    _log_chunked_once(chunk)
    params = self.params if params is None else params
    batch, length = tokens.shape
    following = np.concatenate([tokens[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    cache, last_hidden = steps.empty_cache(params, batch)
    lengths = jnp.asarray(lengths)
    for start in range(0, length, chunk):
      piece = slice(start, min(start + chunk, length))
      cache, last_hidden = steps.prefill_chunk(params, cache, last_hidden, jnp.asarray(tokens[:, piece]),
                                               np.int32(start), lengths, jnp.asarray(following[:, piece]))
    return steps.finish_prefill(params, cache, last_hidden, lengths, sampling, forced)

  def _events(self, emitted: Emitted, params, remaining: list[int], stops, stats, speculative: bool,
              rounds: list[list[int]]):
    emitted = jax.device_get(emitted)  # every field's copy started at once: one wait, not five
    tokens, counts, logprobs = emitted.tokens, emitted.count, emitted.logprobs
    top_values, top_ids = emitted.top_logprobs, emitted.top_ids
    for row, request in enumerate(params):
      if remaining[row] <= 0:
        continue
      if speculative and stats["steps"] > 0:
        stats["drafted"] += self._num_draft
        stats["accepted"] += int(counts[row]) - 1
      rounds[row].append(0)
      for j in range(int(counts[row])):
        token = int(tokens[row, j])
        remaining[row] -= 1
        stats["tokens"] += 1
        rounds[row][-1] += 1
        reason = "stop" if token in stops[row] else ("length" if remaining[row] == 0 else None)
        best = slice(0, request.logprobs)
        top = tuple((int(i), float(v)) for i, v in zip(top_ids[row, j, best], top_values[row, j, best]))
        yield TokenEvent(row, token, float(logprobs[row, j]), top, reason)
        if reason is not None:
          remaining[row] = 0
          break

  # ---- teacher forcing ----
  def replay(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
             shape: tuple[int, int] | None = None, rounds: Sequence[Sequence[int]] | None = None,
             params: Any = None) -> list[np.ndarray]:
    """The log-probs generate() reports for `responses` after `prompts` (temperature 1, [len(response)] float32
    each), recomputed by the very compiled prefill and decode calls that sampled them, each given token taking the
    place of a draw: under the same parameters they equal generate()'s bit for bit, in any dtype. That holds for
    sampled requests without top-k / top-p / min-p (RL's rollouts), whose calls these are.

    shape: the (rows, prompt length) generate() padded its call to (`last_shape`; a row's results do not depend
    on its batch mates, so any subset of that call replays at its shape); default: what these prompts pad to.
    rounds: per response, the tokens each call emitted (`last_rounds`) when generate() speculated; None: one
    token a call. params: a parameter tree in the engine's layout (default: the engine's own)."""
    if len(prompts) != len(responses):
      raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if rounds is not None and not self._num_draft:
      raise ValueError("rounds are given but this engine does not speculate (mtp_speculative_decoding is off)")
    for index, response in enumerate(responses):
      if not response:
        raise ValueError(f"response {index} is empty: nothing to replay")
      if rounds is not None and (sum(rounds[index]) < len(response) or rounds[index][:1] != [1]):
        raise ValueError(f"rounds of response {index} ({list(rounds[index])}) do not cover its {len(response)}"
                         " tokens after a one-token prefill")
    prompts = self._check_prompts(prompts, [len(r) for r in responses])
    params = self.params if params is None else params
    chunk = self.config.long_prefill_chunk_size
    tokens, lengths = self._padded(prompts, max(_MIN_BUCKET, self.config.max_prefill_predict_length), chunk)
    if shape is not None:
      if shape[0] < tokens.shape[0] or shape[1] < tokens.shape[1]:
        raise ValueError(f"replay shape {tuple(shape)} is smaller than these prompts need {tokens.shape}")
      tokens = np.pad(tokens, ((0, shape[0] - tokens.shape[0]), (0, shape[1] - tokens.shape[1])))
      lengths = np.pad(lengths, (0, shape[0] - lengths.shape[0]), constant_values=1)
    batch, longest = tokens.shape[0], max(map(len, responses))
    k = self._num_draft if rounds is not None else 0
    forced = np.zeros((batch, longest + k), np.int32)  # each row's response, then its last token repeated
    for row, response in enumerate(responses):
      forced[row, : len(response)] = response
      forced[row, len(response) :] = response[-1]
    # The steps generate() used for temperature-1 requests (no top-k / top-p / min-p), so the very same programs.
    steps = self._steps_for(0, k, greedy_only=False, filtered=False)
    sampling = BatchSampling.of([SamplingParams(temperature=1.0)] * len(prompts), batch)
    # Each call's forced tokens and counts, as arrays made outside the mesh context like generate()'s (an array
    # made under it is laid out on the mesh, a different input to the compiled call: it would compile again).
    every_row = np.ones((batch,), np.int32)
    plan, done = [(forced[:, :1], every_row)], every_row.copy()  # done: tokens of each row emitted so far
    for call in range(1, max(map(len, rounds)) if k else longest):
      if k:
        counts = np.array([r[call] if call < len(r) else 1 for r in rounds] + [1] * (batch - len(rounds)), np.int32)
        plan.append((np.stack([forced[row, d : d + k + 1] for row, d in enumerate(done)]), counts))
        done = np.minimum(done + counts, longest - 1)
      else:
        plan.append((forced[:, call : call + 1], every_row))
    given = [Forced(jnp.asarray(ids), jnp.asarray(counts)) for ids, counts in plan]
    state, emitted = self._prefill(steps, params, tokens, lengths, sampling, chunk, given[0])
    outputs = [emitted]
    with sharding.activate(self.mesh):
      for call, forcing in enumerate(given[1:], start=1):
        if k:
          state, emitted = steps.speculate_sampled(params, state, sampling, np.int32(call), forcing)
        else:
          state, emitted = steps.step(params, state, sampling, np.int32(call), forcing)
        outputs.append(emitted)
    logprobs = jax.device_get([e.logprobs for e in outputs])  # [B, tokens a call] each
    rows = lambda row: np.concatenate([lp[row, : counts[row]] for lp, (_, counts) in zip(logprobs, plan)])
    return [rows(row)[: len(response)].astype(np.float32) for row, response in enumerate(responses)]

  # ---- scoring ----
  def score(self, prompts: Sequence[Sequence[int]], top_n: int = 0,
            batch_invariant: bool = False) -> list[PromptScores]:
    """Log-prob of every prompt token given the ones before it (one causal forward pass per batch of prompts).

    batch_invariant: each prompt goes through a call whose shape follows from its own length alone ([rows, its
    length bucket], padding rows added), so its scores do not change with the prompts scored beside it (in bf16 a
    different batch shape moves them by ~3e-3 on CPU); costs the padding rows."""
    if not 0 <= top_n <= MAX_LOGPROBS:
      raise ValueError(f"top_n must be in [0, {MAX_LOGPROBS}], got {top_n}")
    prompts = self._check_prompts(prompts, [0] * len(prompts))
    if not batch_invariant:
      length = min(_bucket(max(map(len, prompts), default=1), _MIN_BUCKET), self.max_context)
      groups = [(list(range(len(prompts))), length, None)]
    else:
      by_length: dict[int, list[int]] = collections.defaultdict(list)
      for index, prompt in enumerate(prompts):
        by_length[min(_bucket(len(prompt), _MIN_BUCKET), self.max_context)].append(index)
      groups = [(indices, length, min(_INVARIANT_SCORE_ROWS, self._score_rows(length)))
                for length, indices in sorted(by_length.items())]
    results: list[PromptScores | None] = [None] * len(prompts)
    for indices, length, fixed_rows in groups:
      rows = fixed_rows or self._score_rows(length)
      for start in range(0, len(indices), rows):
        chunk = indices[start : start + rows]
        for index, scores in zip(chunk, self._score_call([prompts[i] for i in chunk], length, fixed_rows, top_n)):
          results[index] = scores
    return results

  def _score_rows(self, length: int) -> int:
    rows = max(1, _SCORE_LOGITS_BYTES // (length * self.spec.vocab_size * 4))
    return 1 << (rows.bit_length() - 1)

  def _score_call(self, chunk: list[list[int]], length: int, batch: int | None, top_n: int) -> list[PromptScores]:
    """One forward pass over `chunk` padded to [batch (default: a power of two), length bucket]."""
    tokens = np.zeros((batch or _bucket(len(chunk)), length), np.int32)
    for row, prompt in enumerate(chunk):
      tokens[row, : len(prompt)] = prompt
    with sharding.activate(self.mesh):
      chosen, top_values, top_ids = self._steps_for(0, 0).score(self.params, jnp.asarray(tokens), top_n=top_n)
    chosen, top_values, top_ids = np.asarray(chosen), np.asarray(top_values), np.asarray(top_ids)
    results = []
    for row, prompt in enumerate(chunk):
      n = len(prompt)
      logprobs = chosen[row, :n].astype(np.float32)
      logprobs[0] = np.nan
      tops = [()] + [
          tuple((int(i), float(v)) for i, v in zip(top_ids[row, t], top_values[row, t])) for t in range(1, n)
      ]
      results.append(PromptScores(logprobs, tops))
    return results
