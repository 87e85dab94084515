"""The frozen `Config`: typed fields, derived sizes and the cross-field rules they must satisfy.

Defaults live only in base.yml; this file declares what each key is and which values make sense.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args, get_origin, get_type_hints

from maxtext.configs import layer_pattern

DType = Literal["float32", "bfloat16", "float16"]
# The checkpoint family (HF model_type): same layer math, different HF config and tensor layout, tokenizer.
ModelFamily = Literal["qwen3_next", "qwen3_5_moe"]
TokenizerType = Literal["huggingface"]
GdnKernel = Literal["auto", "reference", "xla", "tpu", "gpu"]
DecodeSamplingStrategy = Literal["greedy", "weighted", "nucleus", "topk"]
GroupedMatmulKernel = Literal["auto", "reference", "gpu", "tokamax", "megablox"]
AttentionKernel = Literal["autoselected", "dot_product", "flash"]
RematPolicy = Literal["none", "minimal", "full"]
DatasetType = Literal["synthetic", "grain", "hf"]
GrainFileType = Literal["jsonl", "parquet", "arrayrecord"]
RlAlgorithm = Literal["grpo", "gspo"]
KlType = Literal["k1", "k3"]
RlLossAggregation = Literal["token_mean", "sequence_mean"]
RopeType = Literal["default", "yarn"]

# The architecture keys: what a checkpoint fixes and stores beside its parameters (models/*.yml set these).
MODEL_KEYS = (
    "model_family", "decoder_layer_types",
    "vocab_size", "base_emb_dim", "base_num_decoder_layers", "base_num_query_heads", "base_num_kv_heads",
    "head_dim", "normalization_layer_epsilon", "rope_max_timescale", "partial_rotary_factor",
    "rope_type", "rope_factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "rope_attention_factor",
    "mscale", "mscale_all_dim", "rope_truncate",
    "full_attention_interval", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
    "linear_num_key_heads", "linear_num_value_heads", "num_experts", "num_experts_per_tok", "norm_topk_prob",
    "base_moe_mlp_dim", "shared_expert_mlp_dim", "logits_via_embedding", "mtp_num_layers",
)


class ConfigError(ValueError):
  """A configuration problem, reported as one line naming the key at fault."""


@dataclasses.dataclass(frozen=True)
class Config:
  model_name: str

  model_family: ModelFamily
  decoder_layer_types: str
  vocab_size: int
  base_emb_dim: int
  base_num_decoder_layers: int
  base_num_query_heads: int
  base_num_kv_heads: int
  head_dim: int
  normalization_layer_epsilon: float
  rope_max_timescale: float
  partial_rotary_factor: float
  rope_type: RopeType
  rope_factor: float
  original_max_position_embeddings: int
  beta_fast: float
  beta_slow: float
  rope_attention_factor: float
  mscale: float
  mscale_all_dim: float
  rope_truncate: bool
  full_attention_interval: int
  linear_conv_kernel_dim: int
  linear_key_head_dim: int
  linear_value_head_dim: int
  linear_num_key_heads: int
  linear_num_value_heads: int
  gdn_chunk_size: int
  gdn_kernel: GdnKernel
  num_experts: int
  num_experts_per_tok: int
  norm_topk_prob: bool
  base_moe_mlp_dim: int
  shared_expert_mlp_dim: int
  logits_via_embedding: bool
  mtp_num_layers: int

  dtype: DType
  weight_dtype: DType

  scan_layers: bool

  per_device_batch_size: float
  max_target_length: int
  init_weights_seed: int

  ici_data_parallelism: int
  ici_fsdp_parallelism: int
  ici_tensor_parallelism: int
  ici_expert_parallelism: int
  ici_context_parallelism: int

  load_parameters_path: str
  base_output_directory: str
  hf_model_path: str
  hf_access_token: str
  use_multimodal: bool
  tokenizer_type: TokenizerType
  tokenizer_path: str

  # ---- MoE paths (issue 5) ----
  sparse_matmul: bool
  megablox: bool
  capacity_factor: float
  grouped_matmul_kernel: GroupedMatmulKernel

  # ---- Training and data (issue 6) ----
  run_name: str
  steps: int
  log_period: int
  learning_rate: float
  warmup_steps_fraction: float
  cosine_learning_rate_final_fraction: float
  learning_rate_schedule_steps: int
  adam_b1: float
  adam_b2: float
  adam_eps: float
  adam_weight_decay: float
  gradient_clipping_threshold: float
  load_balance_loss_weight: float
  mtp_loss_scaling_factor: float
  remat_policy: RematPolicy
  dataset_type: DatasetType
  dataset_path: str
  grain_train_files: str
  grain_file_type: GrainFileType
  hf_path: str
  hf_data_dir: str
  hf_train_files: str
  train_data_columns: str
  add_eos: bool
  packing: bool
  enable_data_shuffling: bool
  data_shuffle_seed: int
  use_sft: bool
  sft_train_on_completion_only: bool
  enable_checkpointing: bool
  async_checkpointing: bool
  checkpoint_period: int
  max_num_checkpoints_to_keep: int
  enable_tensorboard: bool
  dcn_data_parallelism: int
  dcn_fsdp_parallelism: int
  dcn_tensor_parallelism: int
  dcn_expert_parallelism: int
  dcn_context_parallelism: int
  coordinator_address: str
  num_processes: int
  process_id: int
  jax_distributed_initialization_timeout: int
  skip_jax_distributed_system: bool
  data_shards: int


  # ---- Decode and serving (issue 7) ----
  max_prefill_predict_length: int
  long_prefill_chunk_size: int
  prompt: str
  decode_max_new_tokens: int
  decode_sampling_strategy: DecodeSamplingStrategy
  decode_sampling_temperature: float
  decode_sampling_top_k: int
  decode_sampling_nucleus_p: float
  decode_sampling_min_p: float
  decode_presence_penalty: float
  decode_sampling_seed: int
  decode_stop_token_ids: str
  mtp_speculative_decoding: bool
  mtp_num_draft_tokens: int

  server_host: str
  server_port: int
  served_model_name: str
  server_batch_window_ms: float
  server_max_batch_size: int
  server_api_key: str
  server_max_body_bytes: int
  server_max_prompts_per_request: int
  server_tokenize_timeout_s: float
  server_request_timeout_s: float
  server_allow_client_chat_template: bool
  server_continuous_batching: bool
  enable_prefix_caching: bool
  prefix_cache_bytes: int
  prefill_chunk_size: int
  server_batch_invariant_scoring: bool

  # ---- Attention kernel and deviceless compilation (issue 8) ----
  attention: AttentionKernel
  compile_topology: str
  compile_topology_num_slices: int
  compiled_trace_file: str

  # ---- RL post-training (issue 17) ----
  rl_algorithm: RlAlgorithm
  rl_train_files: str
  rl_eval_files: str
  rl_reward: str
  num_generations: int
  rollout_batch_size: int
  max_response_length: int
  rl_global_batch_size: int
  rl_temperature: float
  eps_clip: float
  eps_clip_high: float
  kl_coef: float
  kl_type: KlType
  rl_loss_aggregation: RlLossAggregation
  rl_advantage_std_normalization: bool
  importance_sampling_cap: float
  rl_replay_logprobs: bool
  rl_dynamic_sampling: bool
  rl_dynamic_sampling_max_rounds: int
  rl_eval_period: int
  rl_eval_num_samples: int

  def __post_init__(self) -> None:
    _validate(self)

  # ---- derived sizes ----
  @property
  def layer_types(self) -> tuple[str, ...]:
    """'linear_attention' or 'full_attention' per decoder layer, as HF's `layer_types`: decoder_layer_types when
    given, else every full_attention_interval-th layer full attention."""
    if self.decoder_layer_types:
      return layer_pattern.parse_layer_types(self.decoder_layer_types)
    return layer_pattern.interval_pattern(self.base_num_decoder_layers, self.full_attention_interval)

  @property
  def num_blocks(self) -> int:
    """Repeats of the shortest repeating block of layer_types; the scan length when scan_layers."""
    return self.base_num_decoder_layers // layer_pattern.block_length(self.layer_types)

  @property
  def rotary_dim(self) -> int:
    return int(round(self.head_dim * self.partial_rotary_factor))

  @classmethod
  def field_types(cls) -> dict[str, type]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def allowed_values(annotation) -> tuple | None:
  """The permitted values of a Literal-typed field, else None."""
  if get_origin(annotation) is Literal:
    return get_args(annotation)
  return None


_POSITIVE_INTS = (
    "vocab_size", "base_emb_dim", "base_num_decoder_layers", "base_num_query_heads", "base_num_kv_heads",
    "head_dim", "full_attention_interval", "linear_conv_kernel_dim", "linear_key_head_dim",
    "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads", "gdn_chunk_size", "num_experts",
    "num_experts_per_tok", "base_moe_mlp_dim", "shared_expert_mlp_dim", "max_target_length",
)
_MESH_AXES = ("ici_data_parallelism", "ici_fsdp_parallelism", "ici_tensor_parallelism", "ici_expert_parallelism",
              "ici_context_parallelism")


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _validate(c: Config) -> None:
  for name in _POSITIVE_INTS:
    _require(getattr(c, name) > 0, f"config key '{name}' must be > 0, got {getattr(c, name)}")
  _require(c.mtp_num_layers >= 0, f"config key 'mtp_num_layers' must be >= 0, got {c.mtp_num_layers}")
  _require(c.per_device_batch_size > 0, f"config key 'per_device_batch_size' must be > 0, got {c.per_device_batch_size}")
  _require(c.normalization_layer_epsilon > 0, "config key 'normalization_layer_epsilon' must be > 0")
  _require(c.rope_max_timescale > 0, "config key 'rope_max_timescale' must be > 0")
  _require(
      0.0 < c.partial_rotary_factor <= 1.0,
      f"config key 'partial_rotary_factor' must be in (0, 1], got {c.partial_rotary_factor}",
  )
  rotary = c.head_dim * c.partial_rotary_factor
  _require(
      abs(rotary - round(rotary)) < 1e-9 and int(round(rotary)) % 2 == 0,
      f"config key 'partial_rotary_factor' ({c.partial_rotary_factor}) times head_dim ({c.head_dim}) must be an even"
      " integer (the rotary dimension)",
  )
  _validate_rope(c)
  _require(
      c.base_num_query_heads % c.base_num_kv_heads == 0,
      f"config key 'base_num_query_heads' ({c.base_num_query_heads}) must be a multiple of 'base_num_kv_heads'"
      f" ({c.base_num_kv_heads})",
  )
  _require(
      c.linear_num_value_heads % c.linear_num_key_heads == 0,
      f"config key 'linear_num_value_heads' ({c.linear_num_value_heads}) must be a multiple of"
      f" 'linear_num_key_heads' ({c.linear_num_key_heads})",
  )
  _require(
      c.num_experts_per_tok <= c.num_experts,
      f"config key 'num_experts_per_tok' ({c.num_experts_per_tok}) must not exceed 'num_experts' ({c.num_experts})",
  )
  if c.model_family == "qwen3_5_moe":
    _require(c.norm_topk_prob, "config key 'norm_topk_prob' must be true for model_family=qwen3_5_moe (HF always"
             " renormalises its top-k weights)")
  if c.decoder_layer_types:
    _validate_layer_types(c)
  else:
    _require(
        c.full_attention_interval <= c.base_num_decoder_layers,
        f"config key 'full_attention_interval' ({c.full_attention_interval}) exceeds 'base_num_decoder_layers'"
        f" ({c.base_num_decoder_layers}): the model would have no attention layer",
    )
  if c.scan_layers and not c.decoder_layer_types:
    _require(
        c.base_num_decoder_layers % c.full_attention_interval == 0,
        f"config key 'base_num_decoder_layers' ({c.base_num_decoder_layers}) must be a multiple of"
        f" 'full_attention_interval' ({c.full_attention_interval}) when scan_layers=true",
    )
  _require(not c.use_multimodal, "config key 'use_multimodal' must be false: only the text model is supported (no image/video inputs)")
  for name in _MESH_AXES:
    value = getattr(c, name)
    _require(value == -1 or value >= 1, f"config key '{name}' must be -1 (auto) or >= 1, got {value}")
  _require(
      sum(getattr(c, name) == -1 for name in _MESH_AXES) <= 1,
      "at most one of " + ", ".join(f"'{n}'" for n in _MESH_AXES) + " may be -1",
  )
  tensor = c.ici_tensor_parallelism
  if tensor > 1:
    for name in ("base_num_query_heads", "linear_num_key_heads"):
      _require(
          getattr(c, name) % tensor == 0,
          f"config key '{name}' ({getattr(c, name)}) must be divisible by 'ici_tensor_parallelism' ({tensor})",
      )
  expert = c.ici_expert_parallelism
  if expert > 1:
    _require(
        c.num_experts % expert == 0,
        f"config key 'num_experts' ({c.num_experts}) must be divisible by 'ici_expert_parallelism' ({expert})",
    )
  _validate_context(c)
  _validate_moe(c)
  _validate_training(c)
  _validate_inference(c)
  _validate_compile(c)
  _validate_rl(c)
  _validate_processes(c)


# Each area's rules live in its own function so the sections above stay independent.


def _validate_context(c: Config) -> None:
  # The sequence splits evenly over the context axis (ici x dcn); -1 sizes are checked when the mesh is built.
  context = c.ici_context_parallelism * c.dcn_context_parallelism
  if context > 1:
    _require(
        c.max_target_length % context == 0,
        f"context parallelism {context} (ici_context_parallelism {c.ici_context_parallelism} x"
        f" dcn_context_parallelism {c.dcn_context_parallelism}) must divide 'max_target_length'"
        f" ({c.max_target_length})",
    )


def _validate_layer_types(c: Config) -> None:
  try:
    types = layer_pattern.parse_layer_types(c.decoder_layer_types)
  except ValueError as e:
    raise ConfigError(f"config key 'decoder_layer_types': {e}") from None
  _require(
      len(types) == c.base_num_decoder_layers,
      f"config key 'decoder_layer_types' lists {len(types)} layers but 'base_num_decoder_layers' is"
      f" {c.base_num_decoder_layers}",
  )


# YaRN's keys; 0 means unset (the two required ones) or "derive as HF does" (the attention factor and mscales).
_YARN_REQUIRED = ("rope_factor", "original_max_position_embeddings")
_YARN_OPTIONAL_ZERO = ("rope_attention_factor", "mscale", "mscale_all_dim")


def _validate_rope(c: Config) -> None:
  if c.rope_type == "default":
    for name in _YARN_REQUIRED + _YARN_OPTIONAL_ZERO:
      _require(getattr(c, name) == 0, f"config key '{name}' ({getattr(c, name)}) is a YaRN key but rope_type is"
               " 'default': set rope_type=yarn or leave it at 0")
    return
  for name in _YARN_REQUIRED:
    _require(getattr(c, name) > 0, f"rope_type=yarn needs config key '{name}' (> 0, as in the HF config's"
             f" rope_parameters), got {getattr(c, name)}")
  for name in ("beta_fast", "beta_slow"):
    _require(getattr(c, name) > 0, f"config key '{name}' must be > 0, got {getattr(c, name)}")
  for name in _YARN_OPTIONAL_ZERO:
    _require(getattr(c, name) >= 0, f"config key '{name}' must be >= 0 (0: derived as HF does), got"
             f" {getattr(c, name)}")


def _validate_moe(c: Config) -> None:
  _require(
      c.sparse_matmul is False or c.capacity_factor <= 0,
      f"config key 'capacity_factor' ({c.capacity_factor}) drops tokens only on the dense path: set"
      " sparse_matmul=false to use it, or capacity_factor=-1 for dropless sparse_matmul",
  )


_DCN_AXES = ("dcn_data_parallelism", "dcn_fsdp_parallelism", "dcn_tensor_parallelism", "dcn_expert_parallelism",
             "dcn_context_parallelism")


def _validate_training(c: Config) -> None:
  for name in ("steps", "log_period", "checkpoint_period", "max_num_checkpoints_to_keep"):
    _require(getattr(c, name) > 0, f"config key '{name}' must be > 0, got {getattr(c, name)}")
  _require(c.learning_rate >= 0, f"config key 'learning_rate' must be >= 0, got {c.learning_rate}")
  for name in ("warmup_steps_fraction", "cosine_learning_rate_final_fraction"):
    _require(0.0 <= getattr(c, name) <= 1.0, f"config key '{name}' must be in [0, 1], got {getattr(c, name)}")
  _require(
      c.learning_rate_schedule_steps == -1 or c.learning_rate_schedule_steps > 0,
      f"config key 'learning_rate_schedule_steps' must be -1 (= steps) or > 0, got {c.learning_rate_schedule_steps}",
  )
  for name in ("adam_b1", "adam_b2"):
    _require(0.0 <= getattr(c, name) < 1.0, f"config key '{name}' must be in [0, 1), got {getattr(c, name)}")
  for name in ("adam_eps", "adam_weight_decay", "gradient_clipping_threshold", "load_balance_loss_weight",
               "mtp_loss_scaling_factor"):
    _require(getattr(c, name) >= 0, f"config key '{name}' must be >= 0, got {getattr(c, name)}")
  for name in _DCN_AXES:
    value = getattr(c, name)
    _require(value == -1 or value >= 1, f"config key '{name}' must be -1 (auto) or >= 1, got {value}")
  _require(
      sum(getattr(c, name) == -1 for name in _DCN_AXES) <= 1,
      "at most one of " + ", ".join(f"'{n}'" for n in _DCN_AXES) + " may be -1",
  )
  columns = [col.strip() for col in c.train_data_columns.split(",") if col.strip()]
  _require(bool(columns), "config key 'train_data_columns' must name at least one column")
  if c.use_sft:
    _require(
        len(columns) == 1,
        f"config key 'train_data_columns' must name one column of chat messages with use_sft=true, got"
        f" '{c.train_data_columns}'",
    )
  if c.dataset_type == "grain":
    _require(bool(c.grain_train_files.strip()), "dataset_type=grain needs 'grain_train_files' (glob patterns)")
  if c.dataset_type == "hf":
    _require(bool(c.hf_path.strip()), "dataset_type=hf needs 'hf_path' (a local dataset directory)")


def _validate_inference(c: Config) -> None:
  _validate_decode(c)
  _validate_serving(c)


def _validate_decode(c: Config) -> None:
  _require(c.max_prefill_predict_length > 0, "config key 'max_prefill_predict_length' must be > 0")
  _require(c.long_prefill_chunk_size > 0, f"config key 'long_prefill_chunk_size' must be > 0, got"
           f" {c.long_prefill_chunk_size}")
  # No rule against max_target_length: training runs leave the decode default alone, and the engine pads prompts to
  # at most max_target_length anyway (decode.py refuses a prompt that leaves no room).
  _require(c.decode_max_new_tokens >= -1, "config key 'decode_max_new_tokens' must be -1 (fill) or >= 0")
  _require(c.decode_sampling_temperature > 0, "config key 'decode_sampling_temperature' must be > 0")
  _require(c.decode_sampling_top_k >= 0, "config key 'decode_sampling_top_k' must be >= 0 (0 keeps all)")
  _require(0 < c.decode_sampling_nucleus_p <= 1, "config key 'decode_sampling_nucleus_p' must be in (0, 1]")
  _require(0 <= c.decode_sampling_min_p <= 1, "config key 'decode_sampling_min_p' must be in [0, 1]")
  if c.decode_stop_token_ids not in ("auto", "none"):
    _require(
        all(part.strip().isdigit() for part in c.decode_stop_token_ids.split(",")),
        f"config key 'decode_stop_token_ids' must be auto, none or comma-separated token ids, got"
        f" '{c.decode_stop_token_ids}'",
    )
  _require(
      c.mtp_num_draft_tokens in (1, 2), f"config key 'mtp_num_draft_tokens' must be 1 or 2, got {c.mtp_num_draft_tokens}"
  )
  if c.mtp_speculative_decoding:
    _require(c.mtp_num_layers > 0, "mtp_speculative_decoding=true needs an MTP head: 'mtp_num_layers' is 0")


def _validate_serving(c: Config) -> None:
  _require(0 < c.server_port < 65536, f"config key 'server_port' must be in 1..65535, got {c.server_port}")
  for name, low in (("server_batch_window_ms", 0), ("server_max_batch_size", 1), ("server_max_body_bytes", 1024),
                    ("server_max_prompts_per_request", 1), ("server_tokenize_timeout_s", 0.001),
                    ("server_request_timeout_s", 0), ("prefix_cache_bytes", 0), ("prefill_chunk_size", 1)):
    _require(getattr(c, name) >= low, f"config key '{name}' must be >= {low}, got {getattr(c, name)}")


def _validate_compile(c: Config) -> None:
  _require(
      c.compile_topology_num_slices >= 1,
      f"config key 'compile_topology_num_slices' must be >= 1, got {c.compile_topology_num_slices}",
  )
  if c.compile_topology:
    from maxtext.utils.topology import TopologyError, parse_topology  # noqa: PLC0415 - no jax import at load

    try:
      parse_topology(c.compile_topology)
    except TopologyError as e:
      raise ConfigError(f"config key 'compile_topology': {e}") from None


def _validate_processes(c: Config) -> None:
  _require(c.num_processes >= 0, f"config key 'num_processes' must be >= 0 (0: from the environment), got"
           f" {c.num_processes}")
  _require(c.process_id >= -1, f"config key 'process_id' must be >= 0, or -1 (from the environment), got"
           f" {c.process_id}")
  _require(c.jax_distributed_initialization_timeout > 0, "config key 'jax_distributed_initialization_timeout' must"
           f" be > 0 seconds, got {c.jax_distributed_initialization_timeout}")
  _require(c.data_shards >= 0, f"config key 'data_shards' must be >= 0 (0: one per process), got {c.data_shards}")


def _validate_rl(c: Config) -> None:
  for name in ("num_generations", "rollout_batch_size", "max_response_length", "rl_eval_num_samples"):
    _require(getattr(c, name) > 0, f"config key '{name}' must be > 0, got {getattr(c, name)}")
  # max_response_length against max_target_length is checked by the RL command (post_train/rl/run_config.py):
  # other runs leave the RL defaults alone, as they do the decode ones.
  responses = c.rollout_batch_size * c.num_generations
  if c.rl_global_batch_size:
    _require(
        c.rl_global_batch_size > 0 and c.rl_global_batch_size % c.num_generations == 0
        and responses % c.rl_global_batch_size == 0,
        f"config key 'rl_global_batch_size' ({c.rl_global_batch_size}) must be a multiple of num_generations"
        f" ({c.num_generations}) that divides rollout_batch_size x num_generations ({responses}): whole groups per step",
    )
  _require(c.rl_temperature > 0, f"config key 'rl_temperature' must be > 0, got {c.rl_temperature}")
  _require(0 < c.eps_clip < 1, f"config key 'eps_clip' must be in (0, 1), got {c.eps_clip}")
  _require(c.eps_clip_high > 0, f"config key 'eps_clip_high' must be > 0, got {c.eps_clip_high}")
  _require(c.kl_coef >= 0, f"config key 'kl_coef' must be >= 0, got {c.kl_coef}")
  _require(
      c.importance_sampling_cap == 0 or c.importance_sampling_cap >= 1,
      f"config key 'importance_sampling_cap' must be 0 (off) or >= 1, got {c.importance_sampling_cap}",
  )
  for name in ("rl_dynamic_sampling_max_rounds", "rl_eval_period"):
    _require(getattr(c, name) >= 0, f"config key '{name}' must be >= 0, got {getattr(c, name)}")
  _require(
      ":" not in c.rl_reward or all(part.strip() for part in c.rl_reward.split(":", 1)),
      f"config key 'rl_reward' must be 'math' or 'module:function', got '{c.rl_reward}'",
  )
