"""The jitted, fixed-shape device functions of decoding: prefill, one generate step, one speculative round (greedy,
or sampled: speculative.py).

Each carries a `LoopState` (caches, per-row cursor and last token, presence mask, MTP drafts) that is donated, so
caches update in place. Row b holds `cursor[b]` tokens in its caches; `last[b]` (the newest token, not yet fed)
sits at position cursor[b]. The main model and the MTP drafter share that cursor.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from maxtext.inference import speculative
from maxtext.inference.sampling import BatchSampling, sample, token_logprobs
from maxtext.layers.decode_cache import DecodeContext, GdnCache, KVCache, select_token
from maxtext.models.qwen3_next import Qwen3NextForCausalLM


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoopState:
  cache: Any  # {"decoder": the model's decode cache, "mtp": the MTP layer's KVCache or None}
  cursor: jax.Array  # [B] int32
  last: jax.Array  # [B] int32
  presence: jax.Array  # [B, V] bool: generated so far (presence penalty)
  drafts: jax.Array  # [B, k] int32 MTP drafts of the tokens after `last` ([B, 0] without speculation)
  draft_probs: jax.Array  # [B, k, V] float32: the distribution q each draft was drawn from ([B, k, 0] unless sampled)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Emitted:
  """What one call produced per row: up to n tokens (count of them valid) with their log-probs."""

  tokens: jax.Array  # [B, n] int32
  count: jax.Array  # [B] int32
  logprobs: jax.Array  # [B, n] float32
  top_logprobs: jax.Array  # [B, n, top] float32
  top_ids: jax.Array  # [B, n, top] int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Forced:
  """Teacher forcing (Engine.replay), a runtime input of the same compiled calls that sample: row b takes
  tokens[b, :count[b]] as its next tokens; count 0 samples (every row, in generation). n is 1 for a prefill or a
  step, k + 1 for a speculative round (its first count[b] tokens are emitted, read as the accepted drafts)."""

  tokens: jax.Array  # [B, n] int32
  count: jax.Array  # [B] int32

  @staticmethod
  def none(batch: int, n: int = 1) -> "Forced":
    return Forced(jnp.zeros((batch, n), jnp.int32), jnp.zeros((batch,), jnp.int32))

  def first(self, sampled: jax.Array) -> jax.Array:
    """sampled [B] -> the forced first token where a row is forced."""
    return jnp.where(self.count > 0, self.tokens[:, 0], sampled)


def _emitted(logits: jax.Array, tokens: jax.Array, count: jax.Array, num_top: int) -> Emitted:
  chosen, top_values, top_ids = token_logprobs(logits, tokens, num_top)
  return Emitted(tokens, count, chosen, top_values, top_ids)


def _mark(presence: jax.Array, tokens: jax.Array, count: jax.Array) -> jax.Array:
  """presence [B, V] with tokens[b, :count[b]] set."""
  valid = jnp.arange(tokens.shape[1])[None, :] < count[:, None]
  rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
  return presence.at[rows, tokens].max(valid)


def _keep_token(cache: Any, index: jax.Array, scanned: bool) -> Any:
  """Decoder caches kept per token (keep_all_states) -> those after token index[b] of each row."""
  def visit(entry):
    if isinstance(entry, GdnCache):
      return jax.vmap(select_token, in_axes=(0, None))(entry, index) if scanned else select_token(entry, index)
    return entry

  return jax.tree.map(visit, cache, is_leaf=lambda x: isinstance(x, (GdnCache, KVCache)))


class DecodeSteps:
  """Builds the jitted functions for one model; shapes (batch, prompt bucket) are compiled once each."""

  def __init__(self, model: Qwen3NextForCausalLM, capacity: int, num_top: int, num_draft: int,
               greedy_only: bool = False, filtered: bool = True):
    self.model = model
    # Every request greedy: the sampler is argmax alone (no sort compiled); with drafts, greedy speculation.
    self.greedy_only = greedy_only
    self.filtered = filtered  # a sampled row uses top-k / top-p / min-p (only then does sampling sort the vocabulary)
    self.capacity = capacity  # cache slots per row
    self.num_top = num_top  # top log-probs returned per token (static: 0 or sampling.MAX_LOGPROBS)
    self.num_draft = num_draft  # MTP drafts per round (0: plain decoding)
    self.prefill = jax.jit(self._prefill)
    self.empty_cache = jax.jit(self._empty_cache, static_argnums=(1,))
    self.prefill_chunk = jax.jit(self._prefill_chunk, donate_argnums=(1,))
    self.finish_prefill = jax.jit(self._finish_prefill, donate_argnums=(1,))
    self.step = jax.jit(self._step, donate_argnums=(1,))
    self.speculate = jax.jit(self._speculate, donate_argnums=(1,))
    self.speculate_sampled = jax.jit(self._speculate_sampled, donate_argnums=(1,))
    self.score = jax.jit(self._score, static_argnames=("top_n",))

  def _advance(self, cursor: jax.Array, count: jax.Array | int) -> jax.Array:
    """cursor + count, held where the next call's writes still fit: only rows that have finished (and whose
    outputs are dropped) can reach the cap, since prompt + new tokens <= max_target_length."""
    return jnp.minimum(cursor + count, self.capacity - 1 - self.num_draft)

  # ---- model calls ----
  def _hidden(self, params, tokens, positions, cache, decode):
    return self.model.apply({"params": params}, tokens, positions, cache, decode, method="decode_hidden")

  def _logits(self, params, hidden):
    return self.model.apply({"params": params}, hidden, method="logits_of").astype(jnp.float32)

  def _mtp(self, params, hidden, next_tokens, positions, cache, decode):
    return self.model.apply(
        {"params": params}, hidden, next_tokens, positions, cache, decode, method="mtp_hidden"
    )

  def _draft(self, params, mtp_hidden, mtp_cache, cursor, choose):
    """From MTP hidden [B, E] at position cursor - 1 (its logits predict the token after the one at cursor), draft
    k tokens, chaining the MTP layer on its own hidden state -> (drafts [B, k], their q [B, k, V or 0], MTP cache).
    choose(logits [B, V], index) -> (draft [B], q [B, V or 0])."""
    drafts, probs = [], []
    for index in range(self.num_draft):
      if index:
        positions = (cursor + index - 1)[:, None]
        context = DecodeContext(positions[:, 0], jnp.ones_like(positions, bool))
        mtp_hidden, mtp_cache = self._mtp(
            params, mtp_hidden[:, None], drafts[-1][:, None], positions, mtp_cache, context
        )
        mtp_hidden = mtp_hidden[:, 0]
      draft, q = choose(self._logits(params, mtp_hidden), index)
      drafts.append(draft)
      probs.append(q)
    return jnp.stack(drafts, axis=1), jnp.stack(probs, axis=1), mtp_cache

  @staticmethod
  def _argmax_draft(logits, index):
    del index
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits[:, :0]

  def _sampled_draft(self, sampling: BatchSampling, keys: jax.Array):
    return lambda logits, index: speculative.draw_draft(logits, sampling, keys, index, self.filtered)

  def _first_drafts(self, params, mtp_last, mtp_cache, lengths, sampling: BatchSampling):
    """Drafts after a prefill, from the MTP hidden at each row's last prompt position [B, E] -> (drafts [B, k],
    q [B, k, V or 0], MTP cache). Greedy batches take the argmax; sampled ones draw from q with step 0's round
    keys (the first token's own draw is fold_in(key, 0) untagged)."""
    if self.greedy_only:
      return self._draft(params, mtp_last, mtp_cache, lengths, self._argmax_draft)
    keys = speculative.round_keys(sampling, jnp.zeros((), jnp.int32))
    return self._draft(params, mtp_last, mtp_cache, lengths, self._sampled_draft(sampling, keys))

  # ---- scoring ----
  def _score(self, params, tokens: jax.Array, top_n: int):
    """tokens [B, T] -> log-prob of tokens[:, t] given the ones before [B, T] (index 0 holds 0) and the top_n best
    ([B, T, n] values and ids), from one causal forward pass."""
    logits = self.model.apply({"params": params}, tokens, with_mtp=False).logits
    following = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    chosen, top_values, top_ids = token_logprobs(logits, following, top_n)
    # Position t predicts token t + 1: shift right so index t holds the log-prob of token t.
    shift = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
    return shift(chosen), shift(top_values), shift(top_ids)

  # ---- prefill ----
  def _prefill(self, params, tokens, lengths, sampling: BatchSampling,
               forced: Forced | None = None) -> tuple[LoopState, Emitted]:
    """tokens [B, P] right-padded, lengths [B] >= 1 -> the state after the prompts and the first new token
    (sampled, or forced)."""
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
    valid = positions < lengths[:, None]
    context = DecodeContext(jnp.zeros((batch,), jnp.int32), valid, capacity=self.capacity)
    hidden, cache = self._hidden(params, tokens, positions, None, context)
    last_hidden = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    presence, first, emitted = self._first_token(params, last_hidden, sampling, forced)
    drafts, draft_probs, mtp_cache = jnp.zeros((batch, 0), jnp.int32), jnp.zeros((batch, 0, 0)), None
    if self.num_draft:
      # The MTP layer at position t reads token t + 1: the prompt shifted left, then the new token.
      shifted = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
      next_tokens = jnp.where(positions == (lengths - 1)[:, None], first[:, None], shifted)
      mtp_hidden, mtp_cache = self._mtp(params, hidden, next_tokens, positions, None, context)
      mtp_last = jnp.take_along_axis(mtp_hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
      drafts, draft_probs, mtp_cache = self._first_drafts(params, mtp_last, mtp_cache, lengths, sampling)
    state = LoopState({"decoder": cache, "mtp": mtp_cache}, lengths, first, _mark(presence, first[:, None],
                                                                                     emitted.count), drafts,
                      draft_probs)
    return state, emitted

  def _first_token(self, params, last_hidden, sampling: BatchSampling, forced: Forced | None = None):
    """The hidden state after each prompt [B, E] -> (presence, the first new token [B] (sampled, or forced), its
    Emitted)."""
    batch = last_hidden.shape[0]
    logits = self._logits(params, last_hidden)
    presence = jnp.zeros((batch, logits.shape[-1]), bool)
    first = sample(logits, sampling, presence, jnp.zeros((), jnp.int32), greedy_only=self.greedy_only,
                   filtered=self.filtered)
    if forced is not None:
      first = forced.first(first)
    emitted = _emitted(logits[:, None], first[:, None], jnp.ones((batch,), jnp.int32), self.num_top)
    return presence, first, emitted

  # ---- chunked prefill (long prompts): empty caches, then chunks that attend to them, then the first token ----
  def _empty_cache(self, params, batch: int) -> tuple[Any, jax.Array]:
    """Zero caches of `capacity` slots for `batch` rows (shapes traced from a one-token prefill) and a zero
    last-hidden [B, E]."""
    def prefill(params):
      tokens = jnp.zeros((batch, 1), jnp.int32)
      context = DecodeContext(jnp.zeros((batch,), jnp.int32), jnp.ones((batch, 1), bool), capacity=self.capacity)
      hidden, cache = self._hidden(params, tokens, tokens, None, context)
      mtp_cache = self._mtp(params, hidden, tokens, tokens, None, context)[1] if self.num_draft else None
      return {"decoder": cache, "mtp": mtp_cache}, hidden[:, 0]

    shapes = jax.eval_shape(prefill, params)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def _prefill_chunk(self, params, cache, last_hidden, tokens, start, lengths, following):
    """Prompt tokens start..start+T-1 of every row (tokens [B, T]; `following` [B, T] the token after each) into
    the caches; last_hidden [B, E] becomes the hidden state of each row's last prompt token once this chunk holds
    it. Rows shorter than `start` pass through (their inputs are padding)."""
    batch, length = tokens.shape
    positions = start + jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
    cursor = jnp.full((batch,), start, jnp.int32)
    hidden, decoder = self._hidden(params, tokens, positions, cache["decoder"],
                                   DecodeContext(cursor, positions < lengths[:, None]))
    index = lengths - 1 - start
    here = (index >= 0) & (index < length)
    mine = jnp.take_along_axis(hidden, jnp.clip(index, 0, length - 1)[:, None, None], axis=1)[:, 0]
    last_hidden = jnp.where(here[:, None], mine, last_hidden)
    mtp_cache = cache["mtp"]
    if self.num_draft:
      # The MTP layer at position t reads token t + 1; the last prompt position waits for the first new token.
      context = DecodeContext(cursor, positions < (lengths - 1)[:, None])
      mtp_cache = self._mtp(params, hidden, following, positions, mtp_cache, context)[1]
    return {"decoder": decoder, "mtp": mtp_cache}, last_hidden

  def _finish_prefill(self, params, cache, last_hidden, lengths, sampling: BatchSampling,
                      forced: Forced | None = None) -> tuple[LoopState, Emitted]:
    """After the last chunk: sample the first token (or take the forced one) and (with MTP) feed it at the last
    prompt position and draft."""
    presence, first, emitted = self._first_token(params, last_hidden, sampling, forced)
    batch = first.shape[0]
    drafts, draft_probs, mtp_cache = jnp.zeros((batch, 0), jnp.int32), jnp.zeros((batch, 0, 0)), cache["mtp"]
    if self.num_draft:
      positions = (lengths - 1)[:, None]
      context = DecodeContext(lengths - 1, jnp.ones_like(positions, bool))
      mtp_hidden, mtp_cache = self._mtp(params, last_hidden[:, None], first[:, None], positions, mtp_cache, context)
      mtp_last = mtp_hidden[:, 0]
      drafts, draft_probs, mtp_cache = self._first_drafts(params, mtp_last, mtp_cache, lengths, sampling)
    state = LoopState({"decoder": cache["decoder"], "mtp": mtp_cache}, lengths, first,
                      _mark(presence, first[:, None], emitted.count), drafts, draft_probs)
    return state, emitted

  # ---- one token ----
  def _step(self, params, state: LoopState, sampling: BatchSampling, step: jax.Array,
            forced: Forced | None = None) -> tuple[LoopState, Emitted]:
    """Feed `last` at `cursor`, sample the next token (or take the forced one). step: index of the token being
    drawn (its rng stream)."""
    cursor = state.cursor
    context = DecodeContext(cursor, jnp.ones((cursor.shape[0], 1), bool))
    hidden, cache = self._hidden(params, state.last[:, None], cursor[:, None], state.cache["decoder"], context)
    logits = self._logits(params, hidden[:, 0])
    token = sample(logits, sampling, state.presence, step, greedy_only=self.greedy_only, filtered=self.filtered)
    if forced is not None:
      token = forced.first(token)
    count = jnp.ones_like(cursor)
    emitted = _emitted(logits[:, None], token[:, None], count, self.num_top)
    new_state = LoopState({"decoder": cache, "mtp": state.cache["mtp"]}, self._advance(cursor, 1), token,
                          _mark(state.presence, token[:, None], count), state.drafts, state.draft_probs)
    return new_state, emitted

  # ---- one speculative round ----
  def _verify(self, params, state: LoopState):
    """One forward pass over [last, drafts] (k + 1 tokens per row) -> (hidden [B, k + 1, E], logits [B, k + 1, V],
    the decoder cache after each of those tokens, their positions [B, k + 1])."""
    k, cursor = self.num_draft, state.cursor
    tokens = jnp.concatenate([state.last[:, None], state.drafts], axis=1)  # [B, k + 1]
    positions = cursor[:, None] + jnp.arange(k + 1, dtype=jnp.int32)
    context = DecodeContext(cursor, jnp.ones(tokens.shape, bool), keep_all_states=True)
    hidden, cache = self._hidden(params, tokens, positions, state.cache["decoder"], context)
    return hidden, self._logits(params, hidden), cache, positions

  def _next_round(self, params, state: LoopState, hidden, cache, positions, tokens, accepted, choose) -> LoopState:
    """Keep each row's caches after its last accepted draft, feed the MTP layer the emitted tokens (tokens [B, k + 1],
    the first accepted + 1 valid; the MTP layer at position t reads token t + 1) and draft again."""
    cursor = state.cursor
    cache = _keep_token(cache, accepted, self.model.spec.scan_layers)
    mtp_context = DecodeContext(cursor, jnp.arange(self.num_draft + 1)[None, :] <= accepted[:, None])
    mtp_hidden, mtp_cache = self._mtp(params, hidden, tokens, positions, state.cache["mtp"], mtp_context)
    mtp_last = jnp.take_along_axis(mtp_hidden, accepted[:, None, None], axis=1)[:, 0]
    new_cursor = self._advance(cursor, accepted + 1)
    drafts, draft_probs, mtp_cache = self._draft(params, mtp_last, mtp_cache, new_cursor, choose)
    last = jnp.take_along_axis(tokens, accepted[:, None], axis=1)[:, 0]
    return LoopState({"decoder": cache, "mtp": mtp_cache}, new_cursor, last, state.presence, drafts, draft_probs)

  def _speculate(self, params, state: LoopState) -> tuple[LoopState, Emitted]:
    """Greedy: verify the k drafts in one forward pass of k + 1 tokens; keep the longest agreeing prefix plus the
    model's own next token (1..k+1 tokens per row, exactly what greedy decoding would emit); draft again with MTP."""
    k = self.num_draft
    hidden, logits, cache, positions = self._verify(params, state)
    targets = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # targets[:, j]: the token after tokens[:, j]
    agree = jnp.cumprod((state.drafts == targets[:, :k]).astype(jnp.int32), axis=1)
    accepted = jnp.sum(agree, axis=1)  # [B] drafts accepted
    emitted = _emitted(logits, targets, accepted + 1, self.num_top)
    return self._next_round(params, state, hidden, cache, positions, targets, accepted, self._argmax_draft), emitted

  def _speculate_sampled(self, params, state: LoopState, sampling: BatchSampling, step: jax.Array,
                         forced: Forced | None = None) -> tuple[LoopState, Emitted]:
    """Sampled (speculative.py): accept each draft with probability min(1, p / q), draw the token after the
    accepted ones from norm(max(p - q, 0)) (from p after all k), so the tokens are distributed as plain sampling's;
    draft again from q. step: the round's index (its rng stream). Log-probs are the model's own at temperature 1 of
    the emitted tokens, as plain decoding reports.

    A forced row (forced.tokens [B, k + 1]) emits its first forced.count tokens; its verification reads them as the
    drafts (what it reads after the emitted ones never reaches them)."""
    if forced is not None:
      forcing = forced.count > 0
      state = dataclasses.replace(state, drafts=jnp.where(forcing[:, None], forced.tokens[:, : self.num_draft],
                                                          state.drafts))
    hidden, logits, cache, positions = self._verify(params, state)
    keys = speculative.round_keys(sampling, step)
    p = speculative.target_distributions(logits, sampling, self.filtered)
    accepted, tokens = speculative.accept_and_correct(state.drafts, state.draft_probs, p, keys)
    if forced is not None:
      accepted = jnp.where(forcing, forced.count - 1, accepted)
      tokens = jnp.where(forcing[:, None], forced.tokens, tokens)
    emitted = _emitted(logits, tokens, accepted + 1, self.num_top)
    choose = self._sampled_draft(sampling, keys)
    return self._next_round(params, state, hidden, cache, positions, tokens, accepted, choose), emitted
