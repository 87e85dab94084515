"""Plain and YaRN RoPE against transformers' own rotary embeddings (Qwen3-Next and Qwen3.6), partial rotary dims."""

import numpy as np
import pytest

from maxtext.configs import ConfigError, load_config
from maxtext.layers.rotary import RopeScaling, attention_factor, inverse_frequencies, rotary_cos_sin
from maxtext.models.spec import rope_scaling_of

HEAD_DIM, PARTIAL = 256, 0.25  # Qwen3-Next / Qwen3.6: 64 of 256 dims rotate
YARN_CASES = {
    "qwen_1m": dict(factor=4.0, original_max_position_embeddings=262144),
    "short_original": dict(factor=4.0, original_max_position_embeddings=32),
    "mscales": dict(factor=8.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=0.5),
    "explicit": dict(factor=2.5, original_max_position_embeddings=2048, attention_factor=0.8, beta_fast=16.0,
                     beta_slow=2.0, truncate=False),
}


def _ours(case: dict) -> RopeScaling:
  return RopeScaling(rope_type="yarn", **case) if case else RopeScaling()


def _hf_rotary(family: str, case: dict, theta: float):
  """transformers' rotary embedding module for a config carrying `case` as its HF rope dict."""
  rope = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": PARTIAL}
  if case:
    rope.update(rope_type="yarn", **case)
  common = dict(hidden_size=512, num_attention_heads=2, head_dim=HEAD_DIM, rope_parameters=rope)
  if family == "qwen3_next":
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRotaryEmbedding

    return Qwen3NextRotaryEmbedding(Qwen3NextConfig(**common))
  from transformers import Qwen3_5MoeTextConfig
  from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeTextRotaryEmbedding

  rope.update(mrope_section=[11, 11, 10], mrope_interleaved=True)
  return Qwen3_5MoeTextRotaryEmbedding(Qwen3_5MoeTextConfig(**common))


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe"])
@pytest.mark.parametrize("name", ["default", *YARN_CASES])
def test_cos_sin_match_transformers(family, name):
  import torch

  case, theta = YARN_CASES.get(name, {}), 1e7
  hf = _hf_rotary(family, case, theta)
  rotary_dim = int(HEAD_DIM * PARTIAL)
  # The same float32 frequencies, so positions far past the original context rotate identically.
  np.testing.assert_allclose(inverse_frequencies(rotary_dim, theta, _ours(case)), hf.inv_freq.numpy(), rtol=0)
  assert attention_factor(_ours(case)) == pytest.approx(hf.attention_scaling, rel=1e-12)
  positions = np.array([[0, 1, 31, 32, 33, 95, 4096, 300000]], np.int64)
  x = torch.zeros(1, positions.shape[1], 4, dtype=torch.float32)
  pos = torch.tensor(positions) if family == "qwen3_next" else torch.tensor(positions)[None].expand(3, -1, -1)
  hf_cos, hf_sin = (t.numpy() for t in hf(x, pos))
  cos, sin = rotary_cos_sin(positions, rotary_dim, theta, _ours(case))
  np.testing.assert_allclose(np.asarray(cos), hf_cos, atol=2e-5)
  np.testing.assert_allclose(np.asarray(sin), hf_sin, atol=2e-5)


def test_yarn_changes_the_slow_dims_only():
  """A check of the formula itself: the fastest dims keep their frequency, the slowest are divided by factor."""
  plain = inverse_frequencies(64, 1e7)
  yarn = inverse_frequencies(64, 1e7, _ours(YARN_CASES["short_original"]))
  assert yarn[0] == plain[0]
  np.testing.assert_allclose(yarn[-1], plain[-1] / 4.0, rtol=1e-6)


def test_config_keys_make_the_scaling():
  config = load_config(["rope_type=yarn", "rope_factor=4", "original_max_position_embeddings=32", "mscale=0.5",
                        "mscale_all_dim=1"])
  assert rope_scaling_of(config) == RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=32,
                                                mscale=0.5, mscale_all_dim=1.0)


@pytest.mark.parametrize("argv, message", [
    (["rope_type=yarn"], "rope_type=yarn needs config key 'rope_factor'"),
    (["rope_type=yarn", "rope_factor=4"], "rope_type=yarn needs config key 'original_max_position_embeddings'"),
    (["rope_factor=4"], "config key 'rope_factor' (4.0) is a YaRN key but rope_type is 'default'"),
    (["rope_type=linear"], "config key 'rope_type' must be one of default, yarn; got 'linear'"),
])
def test_bad_rope_keys_are_one_line(argv, message):
  with pytest.raises(ConfigError) as info:
    load_config(argv)
  assert message in str(info.value) and "\n" not in str(info.value)
