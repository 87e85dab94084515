"""The decode engine against independent references: HF `generate`, our own full forward pass, plain greedy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from maxtext.checkpoint_conversion.hf_state import params_from_hf_state
from maxtext.inference.engine import Engine
from maxtext.inference.sampling import SamplingParams
from maxtext.layers.decode_cache import DecodeContext
from maxtext.models.qwen3_next import Qwen3NextForCausalLM
from maxtext.models.spec import ModelSpec
from tests.conftest import build_hf_tiny, our_config

# Different lengths, one longer than a 64-token delta-rule chunk; 32 new tokens each.
PROMPT_LENGTHS = (5, 70, 17)
NEW_TOKENS = 32


def _prompts(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 3) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, n).tolist() for n in lengths]


def _engine(config, params=None) -> Engine:
  # One device: executing the whole model on a multi-device CPU mesh hangs (docs/qwen3-next.md).
  return Engine(config, params, devices=jax.devices()[:1])


def _tokens(events, num_requests: int) -> list[list[int]]:
  out = [[] for _ in range(num_requests)]
  for event in events:
    out[event.request].append(event.token_id)
  return out


@pytest.fixture(scope="module")
def hf_grouped(tmp_path_factory):
  return build_hf_tiny("grouped_values", str(tmp_path_factory.mktemp("hf_decode")))


def test_greedy_generation_matches_hf_generate(hf_grouped):
  vocab = hf_grouped.config_dict["vocab_size"]
  prompts = _prompts(vocab)
  longest = max(map(len, prompts))
  # HF: one left-padded batch with an attention mask, as users batch prompts there.
  input_ids = torch.zeros((len(prompts), longest), dtype=torch.long)
  mask = torch.zeros_like(input_ids)
  for row, prompt in enumerate(prompts):
    input_ids[row, longest - len(prompt):] = torch.as_tensor(prompt)
    mask[row, longest - len(prompt):] = 1
  with torch.no_grad():
    generated = hf_grouped.model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False, pad_token_id=0,
    )
  expected = generated[:, longest:].tolist()

  config = our_config(hf_grouped.config_dict, scan_layers=False, max_target_length=128,
                      max_prefill_predict_length=16)
  params = params_from_hf_state(ModelSpec.from_config(config), hf_grouped.tensors)
  events = list(_engine(config, params).generate(prompts, [SamplingParams(max_tokens=NEW_TOKENS)] * len(prompts)))
  assert _tokens(events, len(prompts)) == expected
  assert [e.finish_reason for e in events if e.finish_reason] == ["length"] * len(prompts)


def test_prefill_then_steps_give_the_full_forward_logits():
  """Scanned layout here (the HF test above decodes unscanned); one block of 3 GDN + 1 attention layers."""
  from maxtext.configs import load_config

  config = load_config(overrides=dict(dtype="float32", scan_layers=True, max_target_length=96,
                                      base_num_decoder_layers=4))
  spec = ModelSpec.from_config(config)
  model = Qwen3NextForCausalLM(spec)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
  lengths, steps = np.array([9, 3]), 6
  sequences = jnp.asarray(np.random.default_rng(0).integers(0, spec.vocab_size, (2, 9 + steps)))
  full = np.asarray(model.apply({"params": params}, sequences, with_mtp=False).logits)

  apply = lambda *args: model.apply({"params": params}, *args, method="decode_hidden")
  logits = lambda hidden: np.asarray(model.apply({"params": params}, hidden, method="logits_of"))
  prompt = jnp.where(jnp.arange(16)[None] < lengths[:, None], jnp.pad(sequences, ((0, 0), (0, 1)))[:, :16], 0)
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  prefill = DecodeContext(jnp.zeros(2, jnp.int32), positions < lengths[:, None], capacity=32)
  hidden, cache = jax.jit(apply)(prompt, positions, None, prefill)
  prefill_logits = logits(hidden)
  for row, n in enumerate(lengths):
    np.testing.assert_allclose(prefill_logits[row, :n], full[row, :n], rtol=0, atol=2e-5)
  step = jax.jit(apply)
  cursor = jnp.asarray(lengths, jnp.int32)
  for _ in range(steps):
    token = jnp.take_along_axis(sequences, cursor[:, None], axis=1)
    context = DecodeContext(cursor, jnp.ones((2, 1), bool))
    hidden, cache = step(token, cursor[:, None], cache, context)
    expected = np.take_along_axis(full, np.asarray(cursor)[:, None, None], axis=1)
    np.testing.assert_allclose(logits(hidden), expected, rtol=0, atol=2e-5)
    cursor = cursor + 1


@pytest.fixture(scope="module")
def mtp_engines():
  from maxtext.configs import load_config

  overrides = dict(dtype="float32", scan_layers=True, max_target_length=64, max_prefill_predict_length=16,
                   mtp_num_layers=1, base_num_decoder_layers=4)
  plain = _engine(load_config(overrides=overrides))
  speculative = _engine(load_config(overrides={**overrides, "mtp_speculative_decoding": True,
                                               "mtp_num_draft_tokens": 2}), plain.params)
  return plain, speculative


def test_speculative_decoding_returns_the_greedy_output(mtp_engines):
  plain, speculative = mtp_engines
  prompts = _prompts(plain.spec.vocab_size, (5, 11, 2))
  requests = [SamplingParams(max_tokens=12, logprobs=2), SamplingParams(max_tokens=7), SamplingParams(max_tokens=12)]
  per_request = lambda events: [[(e.token_id, e.finish_reason) for e in events if e.request == r] for r in range(3)]
  logprobs = lambda events: [[e.logprob for e in events if e.request == r] for r in range(3)]
  expected = list(plain.generate(prompts, requests))
  got = list(speculative.generate(prompts, requests))
  assert speculative.last_stats["drafted"] > 0
  # A round may emit several tokens of one request, so events interleave differently across requests.
  assert per_request(got) == per_request(expected)
  for ours, theirs in zip(logprobs(got), logprobs(expected)):
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_speculative_rounds_keep_accepted_drafts_and_roll_back_rejected_ones(mtp_engines):
  """A random MTP head is almost never right, so feed the verifier oracle drafts: row 0 all right, row 1 the first
  right and the second wrong, row 2 both wrong. Every round must still emit exactly the greedy tokens."""
  plain, speculative = mtp_engines
  prompts = _prompts(plain.spec.vocab_size, (5, 11, 2), seed=4)
  new_tokens = 8
  # Row 0 takes 3 tokens a round while row 2 takes 1: its greedy reference must cover 3 x the rounds, plus drafts.
  greedy = _tokens(plain.generate(prompts, [SamplingParams(max_tokens=3 * new_tokens + 2)] * 3), 3)
  steps = speculative._steps_for(0, 2)
  tokens, lengths = speculative._padded(prompts, 16)
  from maxtext.inference.sampling import BatchSampling

  state, emitted = steps.prefill(speculative.params, jnp.asarray(tokens), jnp.asarray(lengths),
                                 BatchSampling.of([SamplingParams()] * 3, 4))
  outputs = [[int(emitted.tokens[row, 0])] for row in range(3)]
  while min(map(len, outputs)) < new_tokens:
    oracle = np.zeros((4, 2), np.int32)
    for row in range(3):
      right = greedy[row][len(outputs[row]): len(outputs[row]) + 2]
      wrong = [(t + 1) % plain.spec.vocab_size for t in right]
      oracle[row] = (right, [right[0], wrong[1]], wrong)[row]
    state = dataclasses.replace(state, drafts=jnp.asarray(oracle))
    state, emitted = steps.speculate(speculative.params, state)
    counts = np.asarray(emitted.count)
    assert counts[:3].tolist() == [3, 2, 1]
    for row in range(3):
      outputs[row] += np.asarray(emitted.tokens)[row, : counts[row]].tolist()
  for row in range(3):
    assert outputs[row] == greedy[row][: len(outputs[row])]


def test_replay_gives_generates_logprobs_bit_for_bit(mtp_engines):
  """Teacher forcing the sampled tokens through the same prefill and decode calls at the call's shape reproduces
  the reported log-probs exactly in float32, for any subset of the call's rows; and they are the model's (a full
  forward pass agrees to float32 rounding). Speculative rounds replay likewise: tests/trainers/post_train."""
  engine = mtp_engines[0]
  prompts = _prompts(engine.spec.vocab_size, (5, 11, 2, 7, 3), seed=5)
  new_tokens = 5
  requests = [SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=s) for s in range(len(prompts))]
  responses, reported = [[] for _ in prompts], [[] for _ in prompts]
  for event in engine.generate(prompts, requests):
    responses[event.request].append(event.token_id)
    reported[event.request].append(event.logprob)
  assert engine.last_rounds is None and engine.last_shape == (8, 16)
  replayed = engine.replay(prompts, responses, shape=engine.last_shape)
  assert [r.tolist() for r in replayed] == [np.float32(r).tolist() for r in reported]
  subset = [3, 0]  # other rows, other batch mates: a row's results do not depend on them
  again = engine.replay([prompts[i] for i in subset], [responses[i] for i in subset], shape=engine.last_shape)
  assert [a.tolist() for a in again] == [replayed[i].tolist() for i in subset]
  # One causal forward over the right-padded sequences: the positions read hold each prompt + response.
  sequences = np.zeros((len(prompts), 11 + new_tokens), np.int32)
  for row, (prompt, response) in enumerate(zip(prompts, responses)):
    sequences[row, : len(prompt) + new_tokens] = prompt + response
  logits = Qwen3NextForCausalLM(engine.spec).apply({"params": engine.params}, jnp.asarray(sequences),
                                                    with_mtp=False).logits
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  for row, (prompt, response) in enumerate(zip(prompts, responses)):
    expected = [logp[row, len(prompt) - 1 + j, token] for j, token in enumerate(response)]
    np.testing.assert_allclose(replayed[row], expected, rtol=0, atol=2e-5)
  with pytest.raises(ValueError, match="smaller than these prompts need"):
    engine.replay(prompts, responses, shape=(4, 16))
