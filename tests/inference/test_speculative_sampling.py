"""Sampled speculative decoding against an exact reference: the joint distribution of the first tokens it emits is
the model's own (products of softmaxes from one plain forward pass over every continuation), a deliberately wrong
correction rule fails the same check, greedy rows of the batch stay greedy, and the reported log-probs are the
model's as closely as plain sampling's."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtext.configs import load_config
from maxtext.inference import speculative
from maxtext.inference.engine import Engine
from maxtext.inference.sampling import SamplingParams
from maxtext.models.qwen3_next import Qwen3NextForCausalLM
from maxtext.trainers.post_train.rl.losses import token_logprobs

VOCAB, NEW, PROMPT = 4, 3, [1, 2, 3]  # 4**3 = 64 possible continuations
SAMPLED, GREEDY = 2040, 8  # one batch bucket of 2048 rows
# Sharper than a random head's near-uniform softmax, so that the main model's p and the MTP head's q differ (seen:
# p = [.12 .56 .28 .04] against q = [.02 .97 .01 .00]) and drafts are often rejected.
HEAD_SCALE = 20.0


def _config(speculate: bool):
  return load_config(overrides=dict(
      vocab_size=VOCAB, base_num_decoder_layers=4, mtp_num_layers=1, max_target_length=16, max_prefill_predict_length=4,
      dtype="float32", weight_dtype="float32", mtp_speculative_decoding=speculate, mtp_num_draft_tokens=2))


@pytest.fixture(scope="module")
def setup():
  devices = jax.devices()[:1]
  engine = Engine(_config(True), devices=devices)
  params = jax.tree.map(lambda x: x, engine.params)  # a copy of the tree (the arrays are shared)
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * HEAD_SCALE
  engine.params = params
  continuations = np.array(list(itertools.product(range(VOCAB), repeat=NEW)), np.int32)
  sequences = jnp.asarray(np.concatenate([np.tile(PROMPT, (len(continuations), 1)), continuations], axis=1))
  logits = Qwen3NextForCausalLM(engine.spec).apply({"params": params}, sequences[:, :-1], with_mtp=False).logits
  # The trainer's log-probs of every continuation's tokens [64, NEW] (float32), their exact joint in float64.
  logp = np.asarray(token_logprobs(logits, sequences[:, 1:]))[:, len(PROMPT) - 1:]
  return engine, params, logp, np.exp(logp.astype(np.float64).sum(axis=1))


def _generate(engine: Engine):
  """(continuation index per row [rows], greedy rows' tokens, every row's reported log-probs [rows, NEW])."""
  requests = [SamplingParams(max_tokens=NEW, temperature=1.0, seed=s) for s in range(SAMPLED)]
  requests += [SamplingParams(max_tokens=NEW)] * GREEDY
  tokens = [[] for _ in requests]
  logprobs = [[] for _ in requests]
  for event in engine.generate([PROMPT] * len(requests), requests):
    tokens[event.request].append(event.token_id)
    logprobs[event.request].append(event.logprob)
  index = np.ravel_multi_index(np.asarray(tokens).T, (VOCAB,) * NEW)
  return index, np.asarray(tokens[SAMPLED:]), np.asarray(logprobs)


def _chi_square(index: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
  """(Pearson's statistic of the sampled rows against `probs`, its 0.999 quantile under the null hypothesis).
  Cells expected below 5 times are pooled into one; the quantile is Wilson and Hilferty's approximation."""
  counts = np.bincount(index[:SAMPLED], minlength=probs.size)
  expected = probs * SAMPLED
  big = expected >= 5
  observed = np.append(counts[big], counts[~big].sum())
  wanted = np.append(expected[big], expected[~big].sum())
  statistic = float(np.sum((observed - wanted) ** 2 / np.maximum(wanted, 1e-12)))
  df = observed.size - 1
  z = 3.09  # the standard normal's 0.999 quantile
  return statistic, df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


@pytest.fixture(scope="module")
def speculated(setup):
  engine = setup[0]
  return _generate(engine), dict(engine.last_stats)


def test_sampled_speculation_draws_the_models_own_distribution(setup, speculated):
  _, _, logp, joint = setup
  (index, greedy_tokens, _), stats = speculated
  accepted = stats["accepted"] / stats["drafted"]
  assert 0.1 < accepted < 0.9, stats  # both acceptance and rejection are exercised
  statistic, bound = _chi_square(index, joint)
  assert statistic < bound, (statistic, bound)
  # Greedy rows in the same batch: one-hot p and q make the rule greedy decoding (the argmax chain of the model).
  chain: list[int] = []
  for position in range(NEW):
    # logp[c, position] is log p(c[position] | prompt, c[:position]): any continuation with that prefix holds it.
    candidates = [logp[np.ravel_multi_index(chain + [t] + [0] * (NEW - position - 1), (VOCAB,) * NEW), position]
                  for t in range(VOCAB)]
    chain.append(int(np.argmax(candidates)))
  assert greedy_tokens.tolist() == [chain] * GREEDY, (greedy_tokens, chain)


def test_a_wrong_correction_rule_fails_the_same_check(setup, monkeypatch):
  """Drawing the token after a rejection from p instead of norm(max(p - q, 0)) over-weights the rejected draft's
  token: the check above must see it (seen: statistic ~430 against a bound ~54)."""
  engine, _, _, joint = setup
  monkeypatch.setattr(speculative, "residual", lambda p, q: p)
  engine._steps.clear()  # retrace with the wrong rule
  try:
    index, _, _ = _generate(engine)
  finally:
    engine._steps.clear()
  statistic, bound = _chi_square(index, joint)
  assert statistic > 2 * bound, (statistic, bound)


def test_reported_logprobs_are_the_models_as_closely_as_plain_sampling(setup, speculated):
  engine, params, logp, _ = setup
  (index, _, reported), _ = speculated
  plain = Engine(_config(False), params=params, devices=jax.devices()[:1])
  plain_index, _, plain_reported = _generate(plain)
  errors = np.abs(reported - logp[index])
  plain_errors = np.abs(plain_reported - logp[plain_index])
  # float32 rounding on both paths, the same size (seen: max 4.3e-6 / 2.9e-6, mean 2.2e-7 / 2.1e-7; the sharpened
  # head's logits are large, so a unit in their last place is ~4e-6). Reporting q's or the tempered log-probs
  # would be off by O(1).
  assert plain_errors.max() < 1e-5, plain_errors.max()
  assert errors.max() <= 2 * plain_errors.max(), (errors.max(), plain_errors.max())
  assert errors.mean() <= 1.5 * plain_errors.mean(), (errors.mean(), plain_errors.mean())
