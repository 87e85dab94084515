"""Shared fixtures: tiny random HF Qwen3-Next models (the independent reference) and our model built from them."""

from __future__ import annotations

import os

# Four host devices so sharding tests can build a real mesh; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.assets.tiny_hf_checkpoint import HF_TINY_CONFIGS, save_tiny_hf  # noqa: E402


@dataclasses.dataclass
class HfTiny:
  name: str
  model: object  # transformers Qwen3NextForCausalLM, float32, eval mode
  config_dict: dict
  tensors: dict[str, np.ndarray]  # hub-layout state dict (what save_pretrained writes)
  path: str  # the save_pretrained directory


def build_hf_tiny(name: str, directory: str, seed: int = 0, **config_overrides) -> HfTiny:
  from safetensors.numpy import load_file

  model, config = save_tiny_hf(name, directory, seed, **config_overrides)
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  return HfTiny(name, model, config.to_dict(), tensors, directory)


@pytest.fixture(scope="session", params=sorted(HF_TINY_CONFIGS))
def hf_tiny(request, tmp_path_factory) -> HfTiny:
  return build_hf_tiny(request.param, str(tmp_path_factory.mktemp(request.param)))


def our_config(hf_config: dict, **overrides):
  from maxtext.configs.hf_config import config_overrides_from_hf
  from maxtext.configs import load_config

  values = {**config_overrides_from_hf(hf_config), "dtype": "float32", "weight_dtype": "float32", **overrides}
  return load_config(overrides=values)


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
  """Per-token KL(reference || ours), computed in float64."""
  def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  log_p, log_q = log_softmax(reference_logits), log_softmax(logits)
  return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def hub_layout(named_tensors: dict) -> dict[str, np.ndarray]:
  """transformers' in-memory names (fused `experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) ->
  the hub's per-expert names, as numpy float32 arrays."""
  out = {}
  for name, tensor in named_tensors.items():
    array = tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)
    if name.endswith("experts.gate_up_proj"):
      prefix, inter = name[: -len("gate_up_proj")], array.shape[1] // 2
      for e in range(array.shape[0]):
        out[f"{prefix}{e}.gate_proj.weight"] = array[e, :inter]
        out[f"{prefix}{e}.up_proj.weight"] = array[e, inter:]
    elif name.endswith("experts.down_proj"):
      prefix = name[: -len("down_proj")]
      for e in range(array.shape[0]):
        out[f"{prefix}{e}.down_proj.weight"] = array[e]
    else:
      out[name] = array
  return out


def build_qwen36_tiny(name: str, directory: str, seed: int = 0, **text_overrides) -> HfTiny:
  """A tiny random Qwen3_5MoeForConditionalGeneration saved with save_pretrained (experts per expert)."""
  from tests.assets.tiny_qwen36_checkpoint import read_tensors, save_tiny_qwen36

  model, config = save_tiny_qwen36(name, directory, seed, **text_overrides)
  return HfTiny(name, model, config.to_dict(), read_tensors(directory), directory)


@pytest.fixture(scope="session")
def qwen36_periodic(tmp_path_factory) -> HfTiny:
  """Tiny Qwen3.6 with its periodic pattern (3 GDN + 1 attention, twice)."""
  return build_qwen36_tiny("periodic", str(tmp_path_factory.mktemp("qwen36_periodic")))


@pytest.fixture(scope="session")
def qwen36_irregular(tmp_path_factory) -> HfTiny:
  """Tiny Qwen3.6 with a non-periodic layer_types and a tied head."""
  return build_qwen36_tiny("irregular", str(tmp_path_factory.mktemp("qwen36_irregular")))


@pytest.fixture(params=["periodic", "irregular"])
def hf_qwen36(request) -> HfTiny:
  """Both tiny Qwen3.6 shapes, built once per session."""
  return request.getfixturevalue(f"qwen36_{request.param}")
