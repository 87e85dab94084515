"""Multi-token prediction: from the main model's final hidden state and the embedding of the next token,
one more decoder layer predicts the token after next (vLLM/SGLang `qwen3_next_mtp` layout)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from maxtext.layers.decode_cache import DecodeContext, KVCache
from maxtext.layers.decoder_layer import FULL_ATTENTION, DecoderLayer
from maxtext.layers.linear import Linear
from maxtext.layers.norms import RMSNorm
from maxtext.layers.specs import AttentionSpec, GatedDeltaNetSpec, MoeSpec, Numerics


def shift_left(tokens: jax.Array, steps: int) -> jax.Array:
  """tokens [B, T] -> tokens[:, steps:] padded with zeros at the end (positions past the end are masked later)."""
  return jnp.pad(tokens[:, steps:], ((0, 0), (0, steps)))


class MultiTokenPredictor(nn.Module):
  """`num_layers` chained steps sharing fc and norms; step s reads tokens shifted by s + 1."""

  num_layers: int
  attention: AttentionSpec
  gated_delta_net: GatedDeltaNetSpec
  moe: MoeSpec
  eps: float = 1e-6
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(
      self,
      hidden: jax.Array,
      tokens: jax.Array,
      embed,
      cos: jax.Array,
      sin: jax.Array,
      segment_ids: jax.Array | None = None,
      cache: KVCache | None = None,
      decode: DecodeContext | None = None,
  ):
    """hidden: main model output after its final norm [B, T, E]; embed: token ids -> embeddings.

    Returns per step (hidden after the MTP norm [B, T, E], router stats); the head is applied by the caller.
    With `decode` (drafting), `tokens` are already the next tokens (tokens[t] follows position t), only the first
    step runs, and the result is (hidden after the MTP norm [B, T, E], its layer's new KVCache).
    """
    norm_embedding = RMSNorm(self.eps, self.numerics, name="pre_fc_norm_embedding")
    norm_hidden = RMSNorm(self.eps, self.numerics, name="pre_fc_norm_hidden")
    fc = Linear((hidden.shape[-1],), ("mlp", "embed"), self.numerics, name="fc")
    final_norm = RMSNorm(self.eps, self.numerics, name="norm")
    layer = lambda step: DecoderLayer(
        FULL_ATTENTION, self.attention, self.gated_delta_net, self.moe, self.eps, self.numerics, name=f"layers_{step}"
    )
    if decode is not None:
      h = fc(jnp.concatenate([norm_embedding(embed(tokens)), norm_hidden(hidden)], axis=-1))
      h, _, new_cache = layer(0)(h, cos, sin, None, cache, decode)
      return final_norm(h), new_cache
    outputs = []
    for step in range(self.num_layers):
      next_embedding = norm_embedding(embed(shift_left(tokens, step + 1)))
      h = fc(jnp.concatenate([next_embedding, norm_hidden(hidden)], axis=-1))
      h, stats = layer(step)(h, cos, sin, segment_ids)
      hidden = final_norm(h)
      outputs.append((hidden, stats))
    return outputs
