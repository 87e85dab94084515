"""Qwen3.6 (HF qwen3_5_moe): our model on the weights of a tiny random Qwen3_5MoeForConditionalGeneration
reproduces its float32 logits (scanned and unscanned, a periodic and a non-periodic layer pattern), fused 3-D
experts load the same parameters, and jax.grad equals torch autograd."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from maxtext.checkpoint_conversion.hf_state import params_from_hf_state
from maxtext.models.params import flatten
from maxtext.models.qwen3_next import Qwen3NextForCausalLM
from maxtext.models.spec import ModelSpec
from tests.assets.tiny_qwen36_checkpoint import fuse_experts
from tests.conftest import hub_layout, kl_divergence, our_config

LENGTH = 70  # not a multiple of the 64-token chunk


def _spec(hf, **overrides):
  return ModelSpec.from_config(our_config(hf.config_dict, **overrides))


def test_config_comes_from_the_nested_text_config(hf_qwen36):
  config = our_config(hf_qwen36.config_dict)
  text = hf_qwen36.config_dict["text_config"]
  assert config.model_family == "qwen3_5_moe" and config.norm_topk_prob
  assert config.layer_types == tuple(text["layer_types"])
  assert config.logits_via_embedding == text["tie_word_embeddings"]
  spec = ModelSpec.from_config(config)
  # Qwen3.6's pattern scans in blocks of 4; the non-periodic one has no shorter repeat than the whole model.
  assert (spec.block_length, spec.num_blocks) == ((4, 2) if hf_qwen36.name == "periodic" else (5, 1))


@pytest.mark.parametrize("shape, scan_layers", [("periodic", True), ("irregular", True), ("irregular", False)],
                         ids=["periodic-scanned", "irregular-scanned", "irregular-unscanned"])
def test_logits_match_hf(request, shape, scan_layers):
  hf_qwen36 = request.getfixturevalue(f"qwen36_{shape}")
  tokens = np.random.default_rng(1).integers(0, hf_qwen36.config_dict["text_config"]["vocab_size"], (2, LENGTH))
  with torch.no_grad():
    theirs = hf_qwen36.model(input_ids=torch.as_tensor(tokens)).logits.numpy()
  spec = _spec(hf_qwen36, scan_layers=scan_layers)
  params = params_from_hf_state(spec, hf_qwen36.tensors)
  out = jax.jit(lambda p, t: Qwen3NextForCausalLM(spec).apply({"params": p}, t, with_mtp=False))(
      params, jnp.asarray(tokens))
  ours = np.asarray(out.logits)
  assert ours.dtype == np.float32 and ours.shape == theirs.shape
  assert kl_divergence(theirs, ours).max() < 1e-6
  assert np.abs(ours - theirs).max() < 1e-4


def test_fused_experts_give_the_same_parameters(hf_qwen36):
  spec = _spec(hf_qwen36, scan_layers=False)
  fused = fuse_experts(hf_qwen36.tensors)
  assert any(name.endswith("mlp.experts.gate_up_proj") for name in fused)
  per_expert, from_fused = flatten(params_from_hf_state(spec, hf_qwen36.tensors)), flatten(
      params_from_hf_state(spec, fused))
  assert sorted(per_expert) == sorted(from_fused)
  for path, value in per_expert.items():
    np.testing.assert_array_equal(value, from_fused[path], err_msg=path)


def test_gradients_match_torch_autograd(qwen36_irregular):
  hf_qwen36 = qwen36_irregular
  tokens = np.random.default_rng(4).integers(0, hf_qwen36.config_dict["text_config"]["vocab_size"], (2, 67))
  model = hf_qwen36.model
  model.zero_grad()
  loss = model(input_ids=torch.as_tensor(tokens), labels=torch.as_tensor(tokens)).loss
  loss.backward()
  hf_grads = hub_layout({n: p.grad for n, p in model.named_parameters() if not n.startswith("model.visual.")})

  spec = _spec(hf_qwen36, scan_layers=False, mtp_num_layers=0)
  params = params_from_hf_state(spec, hf_qwen36.tensors)

  def our_loss(p):
    logits = Qwen3NextForCausalLM(spec).apply({"params": p}, jnp.asarray(tokens), with_mtp=False).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jnp.asarray(tokens[:, 1:])).mean()

  value, grads = jax.jit(jax.value_and_grad(our_loss))(params)
  np.testing.assert_allclose(float(value), float(loss.detach()), rtol=1e-5)
  expected, ours = flatten(params_from_hf_state(spec, hf_grads)), flatten(grads)
  assert set(ours) == set(expected)
  for path, grad in ours.items():
    grad, reference = np.asarray(grad, np.float64), expected[path].astype(np.float64)
    scale = np.linalg.norm(reference)
    assert scale > 0, f"reference gradient of {path} is zero: the check would be vacuous"
    assert np.linalg.norm(grad - reference) / scale < 1e-4, path
