"""Our model, loaded with HF weights, reproduces HF's float32 logits and load-balancing loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from maxtext.checkpoint_conversion.hf_state import params_from_hf_state
from maxtext.models.qwen3_next import Qwen3NextForCausalLM
from maxtext.models.spec import ModelSpec
from tests.conftest import kl_divergence, our_config

LENGTH = 100  # not a multiple of the 64-token chunk


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unscanned"])
def test_logits_match_hf(hf_tiny, scan_layers):
  tokens = np.random.default_rng(1).integers(0, hf_tiny.config_dict["vocab_size"], (2, LENGTH))
  with torch.no_grad():
    reference = hf_tiny.model(torch.as_tensor(tokens), output_router_logits=True)
  spec = ModelSpec.from_config(our_config(hf_tiny.config_dict, scan_layers=scan_layers))
  params = params_from_hf_state(spec, hf_tiny.tensors)
  out = jax.jit(lambda p, t: Qwen3NextForCausalLM(spec).apply({"params": p}, t))(params, jnp.asarray(tokens))

  ours, theirs = np.asarray(out.logits), reference.logits.numpy()
  assert ours.dtype == np.float32 and ours.shape == theirs.shape
  assert kl_divergence(theirs, ours).max() < 1e-6
  assert np.abs(ours - theirs).max() < 1e-4
  np.testing.assert_allclose(float(out.aux_loss), float(reference.aux_loss), rtol=1e-5)


def test_scanned_and_unscanned_agree(hf_tiny):
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, hf_tiny.config_dict["vocab_size"], (1, 70)))
  logits = []
  for scan_layers in (True, False):
    spec = ModelSpec.from_config(our_config(hf_tiny.config_dict, scan_layers=scan_layers))
    params = params_from_hf_state(spec, hf_tiny.tensors)
    logits.append(np.asarray(Qwen3NextForCausalLM(spec).apply({"params": params}, tokens).logits))
  np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=1e-5)
