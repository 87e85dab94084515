"""The training loss with MTP against a float64 numpy computation from its definition, and rematerialisation
('full', 'minimal') against storing everything ('none'): the same loss and gradients; scanned 'none', which
recomputes elementwise values in the backward, against the unscanned model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from maxtext.checkpoint_conversion.scan_layout import unscan_layers
from maxtext.configs import load_config
from maxtext.models import params as model_params
from maxtext.models.qwen3_next import Qwen3NextForCausalLM
from maxtext.models.spec import ModelSpec
from maxtext.trainers.loss import training_loss

TINY = {"dtype": "float32", "base_num_decoder_layers": 4, "mtp_num_layers": 1, "max_target_length": 16,
        "scan_layers": True, "mtp_loss_scaling_factor": 0.3, "load_balance_loss_weight": 0.01}
BATCH, LENGTH = 2, 16


def _config(**overrides):
  return load_config(overrides={**TINY, **overrides})


def _batch(vocab_size: int) -> tuple[dict[str, jax.Array], np.ndarray]:
  """A packed batch (row 0 holds two documents, row 1 ends in padding) and the raw token stream [B, T + 1]."""
  stream = np.random.default_rng(3).integers(0, vocab_size, (BATCH, LENGTH + 1))
  segments = np.ones((BATCH, LENGTH), np.int32)
  segments[0, 9:] = 2
  positions = np.where(segments == 1, np.arange(LENGTH), np.arange(LENGTH) - 9)
  mask = np.ones((BATCH, LENGTH), np.float32)
  mask[0, 8] = 0.0  # the last token of document 1 has no next token in its document
  mask[1, 12:] = 0.0  # padding
  segments[1, 13:] = 0
  batch = {"inputs": stream[:, :-1], "targets": stream[:, 1:], "positions": positions, "segment_ids": segments,
           "loss_mask": mask}
  return {k: jnp.asarray(v) for k, v in batch.items()}, stream


def _init(spec: ModelSpec, seed: int):
  return jax.jit(lambda rng: nn.unbox(model_params.init_variables(spec, rng)))(jax.random.key(seed))


def _log_softmax64(logits) -> np.ndarray:
  x = np.asarray(logits, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_mtp_loss_matches_float64_definition():
  config = _config()
  spec = ModelSpec.from_config(config)
  model = Qwen3NextForCausalLM(spec)
  params = _init(spec, 0)
  batch, stream = _batch(config.vocab_size)
  output = jax.jit(lambda p, b: model.apply(p, b["inputs"], b["positions"], b["segment_ids"], with_mtp=True))(
      params, batch)
  total, parts = training_loss(output, batch, config.load_balance_loss_weight, config.mtp_loss_scaling_factor)

  mask, segments = np.asarray(batch["loss_mask"]), np.asarray(batch["segment_ids"])
  main_logp, mtp_logp = _log_softmax64(output.logits), _log_softmax64(output.mtp_logits[0])
  main_terms, mtp_terms = [], []
  for b in range(BATCH):
    for t in range(LENGTH):
      if mask[b, t]:  # position t predicts stream token t + 1
        main_terms.append(-main_logp[b, t, stream[b, t + 1]])
      # MTP at position t predicts stream token t + 2: it exists, is trained on (as the main target of t + 1) and
      # belongs to the document of position t.
      if t + 1 < LENGTH and mask[b, t + 1] and segments[b, t + 1] == segments[b, t]:
        mtp_terms.append(-mtp_logp[b, t, stream[b, t + 2]])
  lm_loss, mtp_loss = np.mean(main_terms), np.mean(mtp_terms)
  assert len(main_terms) == 15 + 12 and len(mtp_terms) == 13 + 11  # row 0 loses t = 7, 8 at the boundary
  weight = config.load_balance_loss_weight
  expected = (lm_loss + weight * float(output.aux_loss) + config.mtp_loss_scaling_factor * mtp_loss
              + weight * float(output.mtp_aux_loss))
  np.testing.assert_allclose(float(parts["lm_loss"]), lm_loss, rtol=1e-6)
  np.testing.assert_allclose(float(parts["mtp_loss"]), mtp_loss, rtol=1e-6)
  np.testing.assert_allclose(float(total), expected, rtol=1e-6)
  assert float(output.mtp_aux_loss) > 0 and abs(mtp_loss - lm_loss) > 1e-3  # a distinct head and its own router


def _loss_and_grads(remat_policy: str, params, batch, scan_layers: bool = True):
  # the MTP layer is never rematerialised
  config = _config(remat_policy=remat_policy, mtp_num_layers=0, scan_layers=scan_layers)
  model = Qwen3NextForCausalLM(ModelSpec.from_config(config))

  def loss(params):
    output = model.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
    return training_loss(output, batch, config.load_balance_loss_weight, config.mtp_loss_scaling_factor)[0]

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def params_batch_and_reference():
  spec = ModelSpec.from_config(_config(remat_policy="none", mtp_num_layers=0))
  params, batch = _init(spec, 1), _batch(spec.vocab_size)[0]
  return params, batch, _loss_and_grads("none", params, batch)


@pytest.mark.parametrize("policy", ["full", "minimal"])
def test_remat_policy_keeps_loss_and_gradients(policy, params_batch_and_reference):
  params, batch, (want_loss, want_grads) = params_batch_and_reference
  got_loss, got_grads = _loss_and_grads(policy, params, batch)
  # Recomputing runs the same float32 ops on the same inputs; only XLA's fusion of the recomputed parts may differ,
  # by a few ulps (seen: bitwise equal).
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_grads), jax.tree.leaves(got_grads)):
    scale = float(jnp.max(jnp.abs(want)))
    assert scale > 0, jax.tree_util.keystr(path)
    error = float(jnp.max(jnp.abs(got - want))) / scale
    assert error < 1e-5, (jax.tree_util.keystr(path), error)


def _unscanned(params, spec: ModelSpec):
  return {"params": unscan_layers(params["params"], spec.num_layers, spec.block_length)}


def test_scanned_none_matches_the_unscanned_model(params_batch_and_reference):
  # Scanned 'none' recomputes the blocks' elementwise values in the backward (models/remat.py); unscanned 'none'
  # is plain autodiff over the same layers: the loss and every layer's gradient agree.
  params, batch, (want_loss, want_grads) = params_batch_and_reference
  spec = ModelSpec.from_config(_config(remat_policy="none", mtp_num_layers=0))
  got_loss, got_grads = _loss_and_grads("none", _unscanned(params, spec), batch, scan_layers=False)
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
  want_grads = _unscanned(want_grads, spec)
  assert jax.tree.structure(got_grads) == jax.tree.structure(want_grads)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_grads), jax.tree.leaves(got_grads)):
    scale = float(jnp.max(jnp.abs(want)))
    assert scale > 0, jax.tree_util.keystr(path)
    error = float(jnp.max(jnp.abs(got - want))) / scale
    assert error < 1e-5, (jax.tree_util.keystr(path), error)


def test_elementwise_primitives_are_named_as_jax_names_them():
  # The policy compares primitive names: a name jax does not use (a typo, a rename) would silently keep that
  # primitive's outputs stacked.
  from jax import lax  # noqa: PLC0415

  from maxtext.models.remat import ELEMENTWISE_PRIMITIVES  # noqa: PLC0415

  names = {value.name for value in vars(lax).values() if isinstance(value, jax.extend.core.Primitive)}
  assert ELEMENTWISE_PRIMITIVES <= names, sorted(ELEMENTWISE_PRIMITIVES - names)
  assert not {"dot_general", "cumsum", "reduce_sum", "gather"} & ELEMENTWISE_PRIMITIVES
