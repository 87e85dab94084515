"""Packed documents (segment_ids + per-document positions) give each document the logits it gets alone: the
attention mask, the GDN conv and the delta-rule state all stop at document boundaries."""

import jax
import jax.numpy as jnp
import numpy as np

from maxtext.configs import load_config
from maxtext.models import params as model_params
from maxtext.models.qwen3_next import Qwen3NextForCausalLM
from maxtext.models.spec import ModelSpec


def test_packed_documents_match_documents_alone():
  config = load_config(overrides={"dtype": "float32", "weight_dtype": "float32", "gdn_chunk_size": 16})
  spec = ModelSpec.from_config(config)
  model = Qwen3NextForCausalLM(spec)
  variables = model_params.init_variables(spec, jax.random.key(0))
  lengths = (37, 20, 43)
  tokens = jax.random.randint(jax.random.key(1), (1, sum(lengths)), 0, config.vocab_size)
  segment_ids = jnp.asarray(np.repeat(np.arange(1, 4), lengths)[None], jnp.int32)
  positions = jnp.asarray(np.concatenate([np.arange(n) for n in lengths])[None], jnp.int32)
  apply = jax.jit(lambda t, p, s: model.apply(variables, t, p, s, with_mtp=False).logits)
  packed = np.asarray(apply(tokens, positions, segment_ids))
  start = 0
  for index, length in enumerate(lengths):
    doc = tokens[:, start : start + length]
    alone = np.asarray(jax.jit(lambda t: model.apply(variables, t, with_mtp=False).logits)(doc))
    error = np.abs(packed[:, start : start + length] - alone).max() / np.abs(alone).max()
    assert error < 1e-5, f"document {index}: relative error {error}"
    start += length
