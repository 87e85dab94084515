"""HF safetensors -> orbax checkpoint, streamed tensor by tensor.

  python3 -m maxtext.checkpoint_conversion.to_maxtext src/maxtext/configs/base.yml hf_model_path=HF_DIR \
      base_output_directory=OUT [model_name=auto|<name>] [scan_layers=true|false]

Writes OUT/0/items (load it with load_parameters_path=OUT/0/items) and OUT/0/maxtext_model.json. Without model_name
the model comes from HF_DIR/config.json (Qwen3-Next or Qwen3.5 / 3.6 MoE); a named model must match it. Tensors keep
the checkpoint's dtype (block FP8 becomes bfloat16); a multimodal checkpoint's vision tower is skipped.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence


from maxtext.checkpoint_conversion import orbax_io
from maxtext.checkpoint_conversion.hf_reader import HfTensorReader
from maxtext.checkpoint_conversion.param_mapping import (
    ParamMapping, hf_shapes, parameter_mappings, resolve_expert_layout, to_ours,
)
from maxtext.checkpoint_conversion.scan_layout import scanned_slot
from maxtext.configs import Config, ConfigError, load_config
from maxtext.models import params as model_params
from maxtext.models.spec import ModelSpec
from maxtext.utils import cli


def _check_tensors(checkpoint: HfTensorReader, table: list[ParamMapping], shapes: dict, key_head_dim: int) -> None:
  """Every expected tensor present with the right shape, nothing unexpected: fail before writing anything."""
  expected = [name for m in table for name in m.hf]
  missing = [name for name in expected if name not in checkpoint]
  if missing:
    raise ConfigError(f"checkpoint is missing tensor '{missing[0]}' ({len(missing)} missing in all)")
  extra = sorted(set(checkpoint.names()) - set(expected))
  if extra:
    raise ConfigError(f"checkpoint has unexpected tensor '{extra[0]}' ({len(extra)} unexpected in all)")
  for m in table:
    for name, want in zip(m.hf, hf_shapes(m, shapes[m.ours], key_head_dim)):
      if checkpoint.shape(name) != want:
        raise ConfigError(f"tensor '{name}' has shape {checkpoint.shape(name)}, expected {want}")


def convert(config: Config, hf_model_path: str, step_dir: str, log=print) -> str:
  """Convert; returns the items path. Nothing appears at `step_dir` unless the conversion completes."""
  checkpoint = HfTensorReader(hf_model_path, log)
  has_mtp = any(name.startswith("mtp.") for name in checkpoint.names())
  if config.mtp_num_layers and not has_mtp:
    log("note: the checkpoint has no mtp.* tensors; converting without the MTP module (mtp_num_layers=0)")
    config = dataclasses.replace(config, mtp_num_layers=0)
  spec = ModelSpec.from_config(config)
  flat_spec = model_params.unscanned(spec)
  table = parameter_mappings(flat_spec, include_mtp=bool(spec.mtp_num_layers))
  table = resolve_expert_layout(table, set(checkpoint.names()))
  unscanned_shapes = model_params.flat_shapes(flat_spec)
  key_head_dim = spec.gated_delta_net.key_head_dim
  _check_tensors(checkpoint, table, unscanned_shapes, key_head_dim)

  place = lambda path: scanned_slot(path, spec.block_length) if spec.scan_layers else (path, None)
  leaves = {}
  for m in table:
    target, index = place(m.ours)
    shape = unscanned_shapes[m.ours] if index is None else (spec.num_blocks, *unscanned_shapes[m.ours])
    leaves[target] = (shape, checkpoint.dtype(m.hf[0]), index is not None)
  writer = orbax_io.StreamingCheckpointWriter(step_dir, leaves)
  try:
    start, done_bytes, last_layer = time.perf_counter(), 0, None
    for m in table:
      array = to_ours(m, [checkpoint.read(name) for name in m.hf], unscanned_shapes[m.ours], key_head_dim)
      target, index = place(m.ours)
      writer.write(target, array, index)
      done_bytes += array.nbytes
      layer = m.ours.split("/")[1] if m.ours.startswith(("decoder/", "mtp/layers")) else m.ours.split("/")[0]
      if layer != last_layer:
        elapsed = time.perf_counter() - start
        log(f"[{elapsed:7.1f}s] {done_bytes / 2**30:8.2f} GiB written; now {layer}")
        last_layer = layer
      del array
    items = writer.publish(orbax_io.model_config_record(config))
  except BaseException:
    writer.abort()
    raise
  log(f"done: {done_bytes / 2**30:.2f} GiB in {time.perf_counter() - start:.1f}s -> {items}")
  return items


def main(argv: Sequence[str]) -> int:
  config = load_config(argv)
  if not config.hf_model_path:
    raise ConfigError("config key 'hf_model_path' must name a local HF checkpoint directory")
  if not config.base_output_directory:
    raise ConfigError("config key 'base_output_directory' must name where to write the checkpoint")
  if not os.path.isdir(config.hf_model_path):
    raise ConfigError(f"hf_model_path '{config.hf_model_path}' is not a local directory (conversion runs offline)")
  if config.hf_access_token:
    print("note: hf_access_token is ignored; the checkpoint is read from the local hf_model_path", file=sys.stderr)
  convert(config, config.hf_model_path, os.path.join(config.base_output_directory, "0"))
  return 0


if __name__ == "__main__":
  cli.run(main)
