"""Engine.score's batch-invariant mode in bfloat16: a prompt's scores are exactly the same whatever is scored
beside it (the default packing moves them: a different batch shape rounds differently)."""

from __future__ import annotations

import jax
import numpy as np

from maxtext.inference.engine import Engine


def test_batch_invariant_scores_do_not_depend_on_the_neighbours():
  from maxtext.configs import load_config

  engine = Engine(load_config(overrides=dict(dtype="bfloat16", weight_dtype="bfloat16", max_target_length=64,
                                             base_num_decoder_layers=4)), devices=jax.devices()[:1])
  rng = np.random.default_rng(0)
  prompt = rng.integers(0, engine.spec.vocab_size, 20).tolist()
  crowds = [[], [rng.integers(0, engine.spec.vocab_size, 25).tolist()],
            [rng.integers(0, engine.spec.vocab_size, n).tolist() for n in (3, 40, 17, 20, 9, 31, 12, 20, 5)]]
  alone = engine.score([prompt], top_n=2, batch_invariant=True)[0]
  for crowd in crowds:
    for together in (engine.score([prompt, *crowd], top_n=2, batch_invariant=True)[0],
                     engine.score([*crowd, prompt], top_n=2, batch_invariant=True)[-1]):
      np.testing.assert_array_equal(together.token_logprobs, alone.token_logprobs)
      assert together.top_logprobs == alone.top_logprobs
  # The same numbers as the packed mode gives, up to bf16 rounding (a check of what is computed, not of invariance).
  packed = engine.score([prompt, *crowds[2]])[0]
  np.testing.assert_allclose(packed.token_logprobs[1:], alone.token_logprobs[1:], atol=2e-2)
