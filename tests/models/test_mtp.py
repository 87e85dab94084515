"""The MTP module against a torch reference assembled from HF's own Qwen3-Next modules."""

import jax.numpy as jnp
import numpy as np
import torch
from transformers.models.qwen3_next import modeling_qwen3_next as hf_modeling

from maxtext.checkpoint_conversion.hf_state import params_from_hf_state
from maxtext.models.qwen3_next import Qwen3NextForCausalLM
from maxtext.models.spec import ModelSpec
from tests.conftest import hub_layout, our_config


def test_mtp_logits_match_torch_reference(hf_tiny):
  config = hf_tiny.model.config
  attention_layer = config.layer_types.index("full_attention")
  torch.manual_seed(5)
  hidden = config.hidden_size
  mtp = torch.nn.ModuleDict({
      "fc": torch.nn.Linear(2 * hidden, hidden, bias=False),
      "pre_fc_norm_embedding": hf_modeling.Qwen3NextRMSNorm(hidden, config.rms_norm_eps),
      "pre_fc_norm_hidden": hf_modeling.Qwen3NextRMSNorm(hidden, config.rms_norm_eps),
      "layer": hf_modeling.Qwen3NextDecoderLayer(config, attention_layer),
      "norm": hf_modeling.Qwen3NextRMSNorm(hidden, config.rms_norm_eps),
  }).eval()
  with torch.no_grad():
    for param in mtp.parameters():
      param.copy_(0.05 * torch.randn_like(param))
  named = {name.replace("layer.", "layers.0."): p for name, p in mtp.named_parameters()}
  mtp_tensors = {f"mtp.{name}": array for name, array in hub_layout(named).items()}

  tokens = np.random.default_rng(6).integers(0, config.vocab_size, (2, 45))
  tokens_t = torch.as_tensor(tokens)
  with torch.no_grad():
    main_hidden = hf_tiny.model.model(tokens_t).last_hidden_state  # after the final norm
    next_tokens = torch.nn.functional.pad(tokens_t[:, 1:], (0, 1))
    h = mtp["fc"](torch.cat([mtp["pre_fc_norm_embedding"](hf_tiny.model.model.embed_tokens(next_tokens)),
                             mtp["pre_fc_norm_hidden"](main_hidden)], dim=-1))
    positions = torch.arange(tokens.shape[1])[None].expand(2, -1)
    rotary = hf_tiny.model.model.rotary_emb(h, positions)
    causal = torch.full((tokens.shape[1],) * 2, float("-inf")).triu(1)[None, None]
    h = mtp["layer"](h, position_embeddings=rotary, attention_mask=causal, position_ids=positions)
    expected = hf_tiny.model.lm_head(mtp["norm"](h)).numpy()

  spec = ModelSpec.from_config(our_config(hf_tiny.config_dict, mtp_num_layers=1))
  params = params_from_hf_state(spec, {**hf_tiny.tensors, **mtp_tensors})
  out = Qwen3NextForCausalLM(spec).apply({"params": params}, jnp.asarray(tokens))
  assert len(out.mtp_logits) == 1
  np.testing.assert_allclose(np.asarray(out.mtp_logits[0]), expected, rtol=0, atol=1e-4)
