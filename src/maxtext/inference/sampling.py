"""Per-request sampling settings and the batched sampler that runs inside the jitted decode step.

Order of the logit transforms (as vLLM): presence penalty -> temperature -> top-k -> top-p -> min-p, then a draw.
Temperature 0 is greedy (argmax of the penalised logits). Rows of one batch may use different settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The most alternatives a step returns per token (the OpenAI API's top_logprobs limit).
MAX_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_tokens: int = 16  # new tokens to generate (0 allowed: score only)
  temperature: float = 0.0  # 0 -> greedy
  top_k: int = 0  # 0 -> off
  top_p: float = 1.0
  min_p: float = 0.0
  presence_penalty: float = 0.0
  stop_token_ids: tuple[int, ...] = ()
  seed: int = 0
  logprobs: int = 0  # how many top alternatives to return per generated token (0 -> none)

  def __post_init__(self) -> None:
    checks = (
        (self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}"),
        (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
        (self.top_k >= 0, f"top_k must be >= 0 (0 is off), got {self.top_k}"),
        (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
        (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
        (0 <= self.logprobs <= MAX_LOGPROBS, f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
    )
    for ok, message in checks:
      if not ok:
        raise ValueError(message)

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  @property
  def filtered(self) -> bool:
    """A sampled request that drops tokens by top-k, top-p or min-p: only its batches sort the vocabulary."""
    return not self.greedy and bool(self.top_k or self.top_p < 1 or self.min_p > 0)


_INT32_MAX = 2**31 - 1


def seed_bits(seed: int) -> int:
  """Any integer seed -> the 32 bits of the request's PRNG key: seeds in [0, 2**32) are kept as they are, wider
  ones (OpenAI seeds are 64-bit) fold their high half in, negative ones wrap as two's complement."""
  wide = int(seed) % 2**64
  return (wide ^ (wide >> 32)) & 0xFFFFFFFF


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BatchSampling:
  """SamplingParams of a batch's rows as arrays [B] (padding rows are greedy)."""

  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  min_p: jax.Array
  presence_penalty: jax.Array
  keys: jax.Array  # [B] PRNG keys, one stream per request (its seed)

  @classmethod
  def of(cls, params: Sequence[SamplingParams], batch: int) -> "BatchSampling":
    rows = list(params) + [SamplingParams()] * (batch - len(params))
    column = lambda name, dtype: jnp.asarray(np.array([getattr(p, name) for p in rows], dtype))
    keys = jax.vmap(jax.random.key)(jnp.asarray(np.array([seed_bits(p.seed) for p in rows], np.uint32)))
    return cls(
        temperature=column("temperature", np.float32),
        top_k=jnp.asarray(np.array([min(p.top_k, _INT32_MAX) for p in rows], np.int32)),  # beyond V: all
        top_p=column("top_p", np.float32),
        min_p=column("min_p", np.float32),
        presence_penalty=column("presence_penalty", np.float32),
        keys=keys,
    )


def sample(logits: jax.Array, sampling: BatchSampling, presence: jax.Array, step: jax.Array, *,
           greedy_only: bool = False, filtered: bool = True) -> jax.Array:
  """logits [B, V] float32; presence [B, V] bool (tokens generated so far); step [] or [B] int -> tokens [B] int32.

  The draw of row b at `step` uses fold_in(its key, step): a request's tokens do not depend on its batch mates.
  greedy_only (static: every row has temperature 0) leaves out the full-vocabulary sort. It is a compile-time
  choice rather than a lax.cond because a GPU conditional reads its predicate back to the host, stalling every
  step's dispatch. filtered=False (static: no row uses top-k, top-p or min-p) leaves it out as well; a row draws
  the same token either way (the Gumbel noise is indexed by token id), so batch mates never change a row's draw.
  """
  logits = logits - sampling.presence_penalty[:, None] * presence.astype(logits.dtype)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if greedy_only:
    return greedy
  return jnp.where(sampling.temperature == 0, greedy, _draw(logits, sampling, step, filtered))


def _sorted_kept(logits: jax.Array, sampling: BatchSampling) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(temperature-scaled logits sorted descending [B, V], their token ids [B, V], the kept mask [B, V]): top-k,
  then top-p on the renormalised top-k mass, then min-p; the most likely token always survives."""
  vocab = logits.shape[-1]
  scaled = logits / jnp.maximum(sampling.temperature, 1e-6)[:, None]
  sorted_logits, order = jax.lax.top_k(scaled, vocab)  # descending
  rank = jnp.arange(vocab)[None, :]
  top_k = jnp.where(sampling.top_k > 0, sampling.top_k, vocab)[:, None]
  keep = rank < top_k
  probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  # top_p 1 is off: the cumulative sum can round to 1 before the tail, which must not drop the tail's tokens.
  keep &= (mass_before < sampling.top_p[:, None]) | (sampling.top_p[:, None] >= 1.0)
  keep &= probs >= sampling.min_p[:, None] * probs[:, :1]
  keep = keep.at[:, 0].set(True)  # the most likely token always survives
  return sorted_logits, order, keep


def _draw(logits: jax.Array, sampling: BatchSampling, step: jax.Array, filtered: bool = True) -> jax.Array:
  """Gumbel-max: argmax of scaled logits + Gumbel noise over the kept tokens. The noise is indexed by token id, so
  with nothing filtered out the sorted draw and the sort-free one pick the same token (a full-vocabulary sort is
  most of a sampled decode step's sampler on a GPU)."""
  vocab = logits.shape[-1]
  steps = jnp.broadcast_to(jnp.asarray(step), sampling.keys.shape)  # one step for all rows, or one per row
  keys = jax.vmap(jax.random.fold_in)(sampling.keys, steps)
  noise = jax.vmap(lambda key: jax.random.gumbel(key, (vocab,)))(keys)
  if not filtered:
    scaled = logits / jnp.maximum(sampling.temperature, 1e-6)[:, None]
    return jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)
  sorted_logits, order, keep = _sorted_kept(logits, sampling)
  sorted_noise = jnp.take_along_axis(noise, order, axis=-1)
  choice = jnp.argmax(jnp.where(keep, sorted_logits + sorted_noise, -jnp.inf), axis=-1)
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def distribution(logits: jax.Array, sampling: BatchSampling, *, filtered: bool = True) -> jax.Array:
  """The distribution `sample` draws from without a presence penalty, in vocabulary order: logits [B, V] float32
  -> probabilities [B, V] float32 (softmax of the scaled logits over the kept tokens; one-hot at the argmax for a
  greedy row). filtered=False (static: no row uses top-k, top-p or min-p) leaves out the full-vocabulary sort.
  Speculative sampling (speculative.py) accepts and resamples against these."""
  greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  if filtered:
    sorted_logits, order, keep = _sorted_kept(logits, sampling)
    sorted_probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    rows = jnp.arange(logits.shape[0])[:, None]
    probs = jnp.zeros_like(sorted_probs).at[rows, order].set(sorted_probs)  # back to vocabulary order
  else:
    probs = jax.nn.softmax(logits / jnp.maximum(sampling.temperature, 1e-6)[:, None], axis=-1)
  return jnp.where((sampling.temperature == 0)[:, None], greedy, probs)


def token_logprobs(logits: jax.Array, tokens: jax.Array, top_n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Log-probs under the unmodified (temperature 1) distribution: logits [..., V], tokens [...] ->
  (logprob of tokens [...], top_n best log-probs [..., top_n], their ids [..., top_n])."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  chosen = jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if not top_n:
    top_values, top_ids = logp[..., :0], tokens[..., None][..., :0]
  elif top_n <= _FEW_BEST:
    top_values, top_ids = _few_best(logp, top_n)
  else:
    top_values, top_ids = jax.lax.top_k(logp, top_n)
  return chosen, top_values, top_ids.astype(jnp.int32)


# Up to this many alternatives come from repeated max passes rather than lax.top_k, which sorts the whole
# vocabulary at every position on CPU (a 600-token echo, vocabulary 151936: top 5 by lax.top_k 45 s, top 1 by one
# pass 4.6 s, nothing 3.1 s; each pass costs about one log-softmax).
_FEW_BEST = 8


def _few_best(logp: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """The n largest of logp [..., V], best first (ties: the lower id first, as lax.top_k), by n argmax passes."""
  values, ids = [], []
  for _ in range(n):
    best = jnp.argmax(logp, axis=-1)
    values.append(jnp.take_along_axis(logp, best[..., None], axis=-1)[..., 0])
    ids.append(best)
    if len(ids) < n:
      logp = jnp.where(jnp.arange(logp.shape[-1]) == best[..., None], -jnp.inf, logp)
  return jnp.stack(values, axis=-1), jnp.stack(ids, axis=-1).astype(jnp.int32)
