"""The batched sampler against float64 numpy: which tokens each filter keeps and how often each is drawn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtext.inference.sampling import BatchSampling, SamplingParams, distribution, sample, token_logprobs

LOGITS = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))  # token 1 most likely, then 3, 4, 2, 0
DRAWS = 4000


def _draws(params: SamplingParams, presence=None) -> np.ndarray:
  """DRAWS tokens drawn at successive steps for one request over LOGITS."""
  logits = jnp.asarray(LOGITS[None], jnp.float32)
  presence = jnp.zeros((1, LOGITS.size), bool) if presence is None else jnp.asarray(presence)[None]
  sampling = BatchSampling.of([params], 1)
  draw = jax.jit(jax.vmap(lambda step: sample(logits, sampling, presence, step)[0]))
  return np.asarray(draw(jnp.arange(DRAWS)))


def _frequencies(tokens: np.ndarray) -> np.ndarray:
  return np.bincount(tokens, minlength=LOGITS.size) / tokens.size


def _assert_distribution(tokens: np.ndarray, expected: np.ndarray) -> None:
  # 5 standard errors of a binomial proportion: fails for a wrong distribution, not by chance.
  tolerance = 5 * np.sqrt(expected * (1 - expected) / tokens.size) + 1e-9
  np.testing.assert_array_less(np.abs(_frequencies(tokens) - expected), tolerance)


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max())
  return e / e.sum()


def test_greedy_takes_the_argmax():
  assert set(_draws(SamplingParams()).tolist()) == {1}


def test_presence_penalty_lowers_generated_tokens():
  presence = np.zeros(LOGITS.size, bool)
  presence[1] = True  # log 0.4 - 2 < log 0.3
  assert set(_draws(SamplingParams(presence_penalty=2.0), presence).tolist()) == {3}


def test_temperature_draws_from_the_scaled_softmax():
  _assert_distribution(_draws(SamplingParams(temperature=0.7, seed=1)), _softmax(LOGITS / 0.7))


def test_top_k_keeps_the_k_most_likely():
  expected = np.array([0, 0.4, 0, 0.3, 0]) / 0.7
  _assert_distribution(_draws(SamplingParams(temperature=1.0, top_k=2, seed=2)), expected)


def test_top_p_keeps_the_smallest_set_reaching_p():
  # Sorted: 0.4, 0.3, 0.15, ... : p = 0.75 needs the first three (0.7 < 0.75).
  expected = np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85
  _assert_distribution(_draws(SamplingParams(temperature=1.0, top_p=0.75, seed=3)), expected)


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
  # min_p 0.3: keep p >= 0.12 -> tokens 1, 3, 4.
  expected = np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85
  _assert_distribution(_draws(SamplingParams(temperature=1.0, min_p=0.3, seed=4)), expected)


def test_a_request_draws_the_same_tokens_whatever_its_batch_mates():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 50)), jnp.float32)
  requests = [SamplingParams(temperature=1.0, seed=7), SamplingParams(), SamplingParams(temperature=1.0, seed=9)]
  presence = jnp.zeros((3, 50), bool)
  together = sample(logits, BatchSampling.of(requests, 3), presence, jnp.int32(5))
  alone = sample(logits[2:], BatchSampling.of(requests[2:], 1), presence[2:], jnp.int32(5))
  assert int(together[2]) == int(alone[0])
  assert int(together[1]) == int(jnp.argmax(logits[1]))


def test_the_sort_free_draw_picks_what_the_sorted_draw_picks():
  """With no top-k / top-p / min-p, filtered=False skips the vocabulary sort; every draw is the same token, also for
  a row whose batch mate filters (so the engine may choose the path per batch)."""
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(6, 300)) * 3, jnp.float32)
  presence = jnp.asarray(rng.random((6, 300)) < 0.1)
  rows = [SamplingParams(temperature=t, seed=i, presence_penalty=0.5) for i, t in enumerate((1.0, 0.7, 1.3, 1.0,
                                                                                               0.0, 2.0))]
  draws = lambda params, filtered: jax.jit(jax.vmap(lambda step: sample(
      logits, BatchSampling.of(params, 6), presence, step, filtered=filtered)))(jnp.arange(200))
  sort_free = np.asarray(draws(rows, False))
  np.testing.assert_array_equal(np.asarray(draws(rows, True)), sort_free)
  with_a_filtering_mate = rows[:5] + [SamplingParams(temperature=2.0, seed=5, presence_penalty=0.5, top_k=3)]
  np.testing.assert_array_equal(np.asarray(draws(with_a_filtering_mate, True))[:, :5], sort_free[:, :5])
  assert len(set(sort_free[:, 0].tolist())) > 20  # really sampled, not one token
  # Which requests make a batch sort: sampled ones with a filter (a greedy one's filter never applies).
  assert [p.filtered for p in (SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=1.0, top_p=0.9),
                               SamplingParams(temperature=1.0, min_p=0.1), SamplingParams(top_k=3),
                               SamplingParams(temperature=1.0))] == [True, True, True, False, False]


def test_token_logprobs_are_the_unmodified_log_softmax():
  logits = np.random.default_rng(1).normal(size=(2, 30))
  tokens = np.array([4, 17])
  chosen, top_values, top_ids = token_logprobs(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens), 3)
  reference = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(np.asarray(chosen), reference[[0, 1], tokens], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(top_ids), np.argsort(-reference, axis=-1)[:, :3])
  np.testing.assert_allclose(np.asarray(top_values), np.sort(reference, axis=-1)[:, ::-1][:, :3], rtol=1e-5)


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(min_p=1.5), dict(logprobs=21),
                                 dict(max_tokens=-1), dict(top_k=-2)])
def test_bad_sampling_params_are_refused(bad):
  with pytest.raises(ValueError, match=next(iter(bad))):
    SamplingParams(**bad)


@pytest.mark.parametrize("top_n", [1, 5, 9])
def test_few_alternatives_match_a_full_sort(top_n):
  # top_n <= 8 takes repeated max passes instead of lax.top_k; ties (two equal logits) keep the lower id first.
  logits = np.random.default_rng(2).normal(size=(2, 3, 40))
  logits[0, 0, 5] = logits[0, 0, 9] = logits[0, 0].max() + 1.0
  tokens = np.zeros((2, 3), np.int32)
  _, top_values, top_ids = token_logprobs(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens), top_n)
  reference = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  order = np.argsort(-reference, axis=-1, kind="stable")[..., :top_n]
  np.testing.assert_array_equal(np.asarray(top_ids), order)
  np.testing.assert_allclose(np.asarray(top_values), np.take_along_axis(reference, order, -1), rtol=1e-5)


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**32, 2**63, 2**64 - 1])
def test_any_64_bit_or_negative_seed_gives_a_stream(seed):
  # Clients send 64-bit seeds and -1; each must give a key, and a reproducible draw.
  first, again = (_draws(SamplingParams(temperature=1.0, seed=seed))[:50] for _ in range(2))
  np.testing.assert_array_equal(first, again)


def test_seeds_below_2_to_32_keep_their_stream_and_wide_ones_differ():
  from maxtext.inference.sampling import seed_bits

  assert [seed_bits(s) for s in (0, 7, 2**32 - 1)] == [0, 7, 2**32 - 1]
  assert seed_bits(2**32 + 7) != seed_bits(7) and seed_bits(-1) == 0  # -1 -> all ones, folded: 0


def test_top_k_beyond_the_vocabulary_keeps_everything():
  expected = _softmax(LOGITS)
  _assert_distribution(_draws(SamplingParams(temperature=1.0, top_k=10**12, seed=5)), expected)


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(), np.eye(LOGITS.size)[1]),
    (SamplingParams(temperature=0.7), _softmax(LOGITS / 0.7)),
    (SamplingParams(temperature=1.0, top_k=2), np.array([0, 0.4, 0, 0.3, 0]) / 0.7),
    (SamplingParams(temperature=1.0, top_p=0.75), np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85),
    (SamplingParams(temperature=1.0, min_p=0.3), np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85),
])
def test_distribution_is_what_the_sampler_draws_from(params, expected):
  # Speculative sampling accepts and corrects against these probabilities (in vocabulary order).
  logits = jnp.asarray(LOGITS[None], jnp.float32)
  sampling = BatchSampling.of([params], 1)
  np.testing.assert_allclose(np.asarray(distribution(logits, sampling))[0], expected, rtol=1e-6, atol=1e-7)
  if not (params.top_k or params.top_p < 1 or params.min_p):  # the sort-free form for unfiltered rows
    np.testing.assert_allclose(np.asarray(distribution(logits, sampling, filtered=False))[0], expected,
                               rtol=1e-6, atol=1e-7)
