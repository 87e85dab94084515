"""Chunked prefill of long prompts (long_prefill_chunk_size): the same caches, first token and MTP drafts as a
one-shot prefill in float32, and no buffer that grows with the prompt squared (the compiled chunk's memory)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtext import sharding
from maxtext.configs import load_config
from maxtext.inference.engine import Engine
from maxtext.inference.sampling import BatchSampling, SamplingParams
from maxtext.inference.steps import DecodeSteps
from maxtext.kernels.attention import cached
from maxtext.layers.decode_cache import GdnCache, KVCache

CHUNK = 32
# Prompts ending in the first chunk, exactly on a chunk boundary, in a middle chunk and in the (shorter) tail chunk.
LENGTHS = (5, 64, 100, 131)
OVERRIDES = dict(dtype="float32", scan_layers=True, base_num_decoder_layers=4, max_target_length=150,
                 max_prefill_predict_length=16, gdn_chunk_size=16, mtp_num_layers=1, mtp_speculative_decoding=True,
                 mtp_num_draft_tokens=2)


def _prompts(vocab, lengths=LENGTHS, seed=5):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def engines():
  """(one-shot, chunked) engines on the same parameters; attention blocks of 32 slots so a chunk's attention to
  the cache takes the blockwise path at this small capacity."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(cached, "_KV_BLOCK", 32)
    one_shot = Engine(load_config(overrides=OVERRIDES), devices=jax.devices()[:1])
    chunked = Engine(load_config(overrides={**OVERRIDES, "long_prefill_chunk_size": CHUNK}), one_shot.params,
                     devices=jax.devices()[:1])
    yield one_shot, chunked


def _prefill_state(engine, prompts, chunked: bool):
  steps = engine._steps_for(0, engine._num_draft, greedy_only=True)
  chunk = engine.config.long_prefill_chunk_size
  tokens, lengths = engine._padded(prompts, 16, chunk)
  sampling = BatchSampling.of([SamplingParams(max_tokens=4)] * len(prompts), tokens.shape[0])
  with sharding.activate(engine.mesh):
    if chunked:
      assert tokens.shape[1] > chunk
      return jax.device_get(engine._chunked_prefill(steps, tokens, lengths, sampling, chunk))
    return jax.device_get(steps.prefill(engine.params, jnp.asarray(tokens), jnp.asarray(lengths), sampling))


def test_chunked_prefill_equals_one_shot(engines):
  one_shot, chunked = engines
  prompts = _prompts(one_shot.spec.vocab_size)
  (expected, expected_emitted), (got, got_emitted) = (_prefill_state(e, prompts, c) for e, c in
                                                        ((one_shot, False), (chunked, True)))
  rows = len(prompts)
  np.testing.assert_array_equal(got.cursor[:rows], LENGTHS)
  np.testing.assert_array_equal(got_emitted.tokens[:rows], expected_emitted.tokens[:rows])
  np.testing.assert_allclose(got_emitted.logprobs[:rows], expected_emitted.logprobs[:rows], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(got.drafts[:rows], expected.drafts[:rows])
  is_cache = lambda x: isinstance(x, (KVCache, GdnCache))
  pairs = zip(jax.tree.leaves(expected.cache, is_leaf=is_cache), jax.tree.leaves(got.cache, is_leaf=is_cache))
  for ours, theirs in pairs:
    if isinstance(ours, KVCache):  # slots past a row's prompt hold padding in both; only the prompt's are read
      key_axis = ours.key.ndim - 3  # scanned caches stack the layers first
      for row, n in enumerate(LENGTHS):
        for a, b in ((ours.key, theirs.key), (ours.value, theirs.value)):
          take = lambda x: np.take(np.take(x, row, axis=key_axis - 1), np.arange(n), axis=key_axis - 1)
          np.testing.assert_allclose(take(b), take(a), rtol=0, atol=1e-5)
    else:
      np.testing.assert_allclose(theirs.state, ours.state, rtol=0, atol=1e-5)
      np.testing.assert_allclose(theirs.conv, ours.conv, rtol=0, atol=1e-6)


def test_blockwise_cache_attention_equals_the_einsum():
  rng = np.random.default_rng(0)
  query = jnp.asarray(rng.normal(size=(2, 20, 4, 8)), jnp.float32)
  key, value = (jnp.asarray(rng.normal(size=(2, 75, 2, 8)), jnp.float32) for _ in range(2))
  cursor = jnp.asarray([0, 41], jnp.int32)  # 75 slots: the last block of 16 overlaps the one before
  blockwise = cached.blockwise_cached_attention_reference(query, key, value, cursor, scale=0.3, block=16)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(cached, "_KV_BLOCK", 1 << 20)
    plain = cached.cached_attention_reference(query, key, value, cursor, scale=0.3)
  np.testing.assert_allclose(np.asarray(blockwise), np.asarray(plain), rtol=0, atol=1e-6)


def test_no_buffer_grows_with_the_prompt_squared():
  """Compiled, not run. The one-shot prefill's reference attention holds [H, T, T] float32 scores (the measure sees
  it at T = 2048); a 512-token chunk's working memory grows at most linearly with the cache (8K -> 32K slots) and
  at 32K stays far below the one-shot's scores at 8K."""
  chunk, heads = 512, 4
  config = load_config(overrides=dict(dtype="float32", max_target_length=2048, long_prefill_chunk_size=chunk,
                                      mtp_num_layers=0))
  assert config.base_num_query_heads == heads
  engine = Engine(config, devices=jax.devices()[:1])
  sds = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  scores = lambda length: heads * length * length * 4
  with sharding.activate(engine.mesh):
    steps = engine._steps_for(0, 0, greedy_only=True)
    sampling = BatchSampling.of([SamplingParams(max_tokens=1)], 1)
    one_shot = steps.prefill.lower(engine.params, sds((1, 2048)), sds((1,)), sampling).compile()
    assert one_shot.memory_analysis().temp_size_in_bytes > scores(2048)
    temp = {}
    for capacity in (8192, 32768):
      steps = DecodeSteps(engine.model, capacity, 0, 0, True)
      cache, last_hidden = jax.eval_shape(lambda params: steps._empty_cache(params, 1), engine.params)
      compiled = steps.prefill_chunk.lower(engine.params, cache, last_hidden, sds((1, chunk)), np.int32(0),
                                           sds((1,)), sds((1, chunk))).compile()
      temp[capacity] = compiled.memory_analysis().temp_size_in_bytes
  assert temp[32768] <= 4 * temp[8192], temp
  assert temp[32768] < scores(8192) / 8, temp
