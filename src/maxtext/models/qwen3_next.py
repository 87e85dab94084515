"""Qwen3-Next: embedding, hybrid decoder (scanned over blocks or unscanned), final norm, head, MTP."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from flax import linen as nn

from maxtext.layers.decode_cache import DecodeContext
from maxtext.layers.decoder_layer import DecoderLayer
from maxtext.layers.linear import DEFAULT_INIT_STDDEV, Linear, partitioned
from maxtext.layers.moe import load_balancing_loss
from maxtext.layers.mtp import MultiTokenPredictor
from maxtext.layers.norms import RMSNorm
from maxtext.layers.rotary import rotary_cos_sin
from maxtext.models import remat
from maxtext.models.spec import ModelSpec

# Parameter collection names of the two layouts (see checkpoint_conversion/scan_layout.py).
SCANNED_BLOCKS = "blocks"


def unscanned_layer_name(index: int) -> str:
  return f"layers_{index}"


def block_layer_name(position: int) -> str:
  return f"layer_{position}"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
  logits: jax.Array  # [B, T, V]
  aux_loss: jax.Array  # [] load-balancing loss over the decoder's MoE layers
  mtp_logits: list[jax.Array]  # per MTP step [B, T, V]: step s at position t predicts token t + s + 2
  mtp_aux_loss: jax.Array  # [] load-balancing loss over the MTP layers (0 without MTP)


def _run_layer(layer: DecoderLayer, x, cos, sin, segment_ids, cache, decode):
  """-> (x, stats, new cache or None): one calling convention for the training and the decoding forms."""
  if decode is None:
    return (*layer(x, cos, sin, segment_ids), None)
  return layer(x, cos, sin, None, cache, decode)


class DecoderBlock(nn.Module):
  """The first spec.block_length layers of the pattern (Qwen3-Next: 3 Gated DeltaNet layers then one attention
  layer): the unit the scan repeats."""

  spec: ModelSpec

  @nn.compact
  def __call__(self, x, cos, sin, segment_ids, cache=None, decode=None):
    """cache: a tuple of the block's layer caches (decoding) or None -> (x, (stats, new caches or None))."""
    spec = self.spec
    stats, new_caches = None, []
    for position in range(spec.block_length):
      layer = _decoder_layer(spec, spec.layer_types[position], block_layer_name(position))
      x, layer_stats, layer_cache = _run_layer(
          layer, x, cos, sin, segment_ids, None if cache is None else cache[position], decode
      )
      new_caches.append(layer_cache)
      stats = layer_stats if stats is None else stats + layer_stats
    return x, (stats, None if decode is None else tuple(new_caches))


def _decoder_layer(spec: ModelSpec, layer_type: str, name: str, layer_cls=DecoderLayer) -> DecoderLayer:
  return layer_cls(
      layer_type, spec.attention, spec.gated_delta_net, spec.moe, spec.eps, spec.numerics, name=name
  )


@functools.lru_cache(maxsize=None)
def _note_unrepeated_pattern(spec: ModelSpec) -> None:
  """Say once that a pattern without a shorter repeat is scanned as a single block (no compile-time saving)."""
  if spec.num_blocks == 1 and spec.num_layers > 1:
    logging.getLogger(__name__).info(
        "layer_types has no block that repeats over all %d layers: scan_layers=true scans one block of all of them"
        " (compiled like scan_layers=false)", spec.num_layers)


class Decoder(nn.Module):
  spec: ModelSpec

  @nn.compact
  def __call__(self, x, cos, sin, segment_ids, cache=None, decode=None):
    """-> (x, router stats summed over layers, new decode cache or None).

    The decode cache mirrors the parameter layout: scanned, a tuple over block positions of caches stacked over
    blocks; unscanned, a tuple over layers. Decoding has no backward pass, so it skips rematerialisation.
    """
    spec = self.spec
    remat_policy = spec.remat_policy if decode is None else None
    if spec.scan_layers:
      if not self.is_initializing():  # shape-only inits (checkpoint layouts) are not runs worth a note
        _note_unrepeated_pattern(spec)
      blocks = nn.scan(
          remat.rematerialised(DecoderBlock, remat_policy, scanned=True, prevent_cse=False),
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
          length=spec.num_blocks,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(spec, name=SCANNED_BLOCKS)
      x, (stacked, new_cache) = blocks(x, cos, sin, segment_ids, cache, decode)
      return x, jax.tree.map(lambda s: jnp.sum(s, axis=0), stacked), new_cache
    stats, new_caches = None, []
    layer_cls = remat.rematerialised(DecoderLayer, remat_policy, scanned=False, prevent_cse=True)
    for index, layer_type in enumerate(spec.layer_types):
      layer = _decoder_layer(spec, layer_type, unscanned_layer_name(index), layer_cls)
      x, layer_stats, layer_cache = _run_layer(
          layer, x, cos, sin, segment_ids, None if cache is None else cache[index], decode
      )
      new_caches.append(layer_cache)
      stats = layer_stats if stats is None else stats + layer_stats
    return x, stats, None if decode is None else tuple(new_caches)


def _in_compute_precision(method):
  """Trace `method` with float32 matmuls when the compute dtype is float32. JAX's default precision rounds float32
  dot operands to TF32 on recent NVIDIA GPUs and to bfloat16 on TPUs (on a CPU it is already float32), so a
  float32 config would not compute in float32 there, and two float32 paths (RL rollout and trainer) would differ
  by far more than rounding. 16-bit compute keeps the backend's default."""

  @functools.wraps(method)
  def traced(self, *args, **kwargs):
    float32 = jnp.dtype(self.spec.numerics.dtype) == jnp.float32
    with jax.default_matmul_precision("highest") if float32 else contextlib.nullcontext():
      return method(self, *args, **kwargs)

  return traced


class Qwen3NextForCausalLM(nn.Module):
  spec: ModelSpec

  def setup(self):
    spec = self.spec
    self.token_embedder = nn.Embed(
        num_embeddings=spec.vocab_size,
        features=spec.emb_dim,
        embedding_init=partitioned(nn.initializers.normal(DEFAULT_INIT_STDDEV), ("vocab", "embed")),
        dtype=spec.numerics.dtype,
        param_dtype=spec.numerics.weight_dtype,
    )
    self.decoder = Decoder(spec)
    self.norm = RMSNorm(spec.eps, spec.numerics)
    if not spec.tie_embeddings:
      self.lm_head = Linear((spec.vocab_size,), ("embed", "vocab"), spec.numerics)
    if spec.mtp_num_layers:
      self.mtp = MultiTokenPredictor(
          spec.mtp_num_layers, spec.attention, spec.gated_delta_net, spec.moe, spec.eps, spec.numerics
      )

  def _head(self, hidden: jax.Array) -> jax.Array:
    if self.spec.tie_embeddings:
      return self.token_embedder.attend(hidden)
    return self.lm_head(hidden)

  @_in_compute_precision
  def __call__(
      self,
      tokens: jax.Array,
      positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      *,
      with_mtp: bool = True,
  ) -> ModelOutput:
    """tokens [B, T] int -> ModelOutput. positions default to 0..T-1; segment_ids mark packed documents."""
    spec = self.spec
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = self.token_embedder(tokens)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    cos, sin = rotary_cos_sin(positions, spec.attention.rotary_dim, spec.rope_theta, spec.rope_scaling)
    x, stats, _ = self.decoder(x, cos, sin, segment_ids)
    hidden = self.norm(x)
    logits = self._head(hidden)
    mtp_logits, mtp_aux = [], jnp.zeros((), jnp.float32)
    if spec.mtp_num_layers and (with_mtp or self.is_initializing()):
      steps = self.mtp(hidden, tokens, self.token_embedder, cos, sin, segment_ids)
      mtp_logits = [self._head(h) for h, _ in steps]
      mtp_aux = sum(load_balancing_loss(s, spec.moe.num_experts) for _, s in steps) / len(steps)
    return ModelOutput(
        logits=logits,
        aux_loss=load_balancing_loss(stats, spec.moe.num_experts),
        mtp_logits=mtp_logits,
        mtp_aux_loss=mtp_aux,
    )

  # ---- decoding (maxtext.inference drives these through `apply(..., method=...)`) ----

  @_in_compute_precision
  def decode_hidden(
      self, tokens: jax.Array, positions: jax.Array, cache, decode: DecodeContext
  ) -> tuple[jax.Array, object]:
    """tokens, positions [B, T] -> (final hidden after the norm [B, T, E], new decode cache).

    A prefill (decode.capacity > 0, cache None) builds the caches; a step continues them (see decode_cache.py).
    """
    spec = self.spec
    x = self.token_embedder(tokens)
    cos, sin = rotary_cos_sin(positions, spec.attention.rotary_dim, spec.rope_theta, spec.rope_scaling)
    x, _, new_cache = self.decoder(x, cos, sin, None, cache, decode)
    return self.norm(x), new_cache

  @_in_compute_precision
  def logits_of(self, hidden: jax.Array) -> jax.Array:
    """Final hidden states [..., E] -> logits [..., V]."""
    return self._head(hidden)

  @_in_compute_precision
  def mtp_hidden(
      self, hidden: jax.Array, next_tokens: jax.Array, positions: jax.Array, cache, decode: DecodeContext
  ) -> tuple[jax.Array, object]:
    """The first MTP layer as a drafter: main hidden h_t [B, T, E] and token t + 1 [B, T] at `positions` ->
    (MTP hidden [B, T, E], whose logits predict token t + 2; the MTP layer's new KVCache)."""
    cos, sin = rotary_cos_sin(positions, self.spec.attention.rotary_dim, self.spec.rope_theta,
                               self.spec.rope_scaling)
    return self.mtp(hidden, next_tokens, self.token_embedder, cos, sin, None, cache, decode)
