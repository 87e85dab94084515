"""jax.grad of our model's loss equals torch autograd of the HF model on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from maxtext.checkpoint_conversion.hf_state import params_from_hf_state
from maxtext.models.params import flatten
from maxtext.models.qwen3_next import Qwen3NextForCausalLM
from maxtext.models.spec import ModelSpec
from tests.conftest import hub_layout, our_config


def test_gradients_match_torch_autograd(hf_tiny):
  tokens = np.random.default_rng(4).integers(0, hf_tiny.config_dict["vocab_size"], (2, 67))
  model = hf_tiny.model
  model.zero_grad()
  loss = model(torch.as_tensor(tokens), labels=torch.as_tensor(tokens)).loss
  loss.backward()
  hf_grads = hub_layout({name: p.grad for name, p in model.named_parameters()})

  spec = ModelSpec.from_config(our_config(hf_tiny.config_dict, scan_layers=False))
  params = params_from_hf_state(spec, hf_tiny.tensors)

  def our_loss(p):
    logits = Qwen3NextForCausalLM(spec).apply({"params": p}, jnp.asarray(tokens), with_mtp=False).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jnp.asarray(tokens[:, 1:])).mean()

  value, grads = jax.jit(jax.value_and_grad(our_loss))(params)
  np.testing.assert_allclose(float(value), float(loss.detach()), rtol=1e-5)
  expected = flatten(params_from_hf_state(spec, hf_grads))
  ours = flatten(grads)
  assert set(ours) == set(expected)
  for path, grad in ours.items():
    grad = np.asarray(grad, np.float64)
    assert np.all(np.isfinite(grad)), path
    reference = expected[path].astype(np.float64)
    scale = np.linalg.norm(reference)
    assert scale > 0, f"reference gradient of {path} is zero: the check would be vacuous"
    assert np.linalg.norm(grad - reference) / scale < 1e-4, path
