"""Orbax checkpoint -> HF safetensors directory (config.json included) that transformers loads.

  python3 -m maxtext.checkpoint_conversion.to_huggingface src/maxtext/configs/base.yml \
      load_parameters_path=OUT/0/items base_output_directory=HF_OUT

Walks the same name table as to_maxtext, backwards; tensors keep the checkpoint's dtype. The HF layout follows the
model family: Qwen3-Next as `Qwen3NextForCausalLM`; Qwen3.5 / 3.6 MoE as the hub's `Qwen3_5MoeForConditionalGeneration`
folder (text model only, experts written one tensor per expert, which transformers fuses on load). The directory is
built under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence

import numpy as np

from maxtext.checkpoint_conversion import orbax_io
from maxtext.configs.hf_config import hf_config_from_config
from maxtext.checkpoint_conversion.param_mapping import parameter_mappings, to_hf
from maxtext.checkpoint_conversion.safetensors_io import ShardedSafetensorsWriter
from maxtext.configs import Config, ConfigError, load_config
from maxtext.models import params as model_params
from maxtext.models.spec import ModelSpec
from maxtext.utils import cli


def export(config: Config, load_parameters_path: str, output_dir: str, shard_bytes: int = 5 << 30, log=print) -> None:
  """Write the HF directory `output_dir` from the checkpoint (which must not exist yet)."""
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir):
    raise FileExistsError(f"output '{output_dir}' already exists; remove it or choose another base_output_directory")
  # The config comes from the checkpoint's stored model record (or a model_name checked against it).
  spec = dataclasses.replace(ModelSpec.from_config(config), scan_layers=False)
  flat = model_params.flatten(orbax_io.load_params(load_parameters_path, spec, cast=False))

  staging = os.path.join(os.path.dirname(output_dir), f".{os.path.basename(output_dir)}.partial-{os.getpid()}")
  shutil.rmtree(staging, ignore_errors=True)
  try:
    writer = ShardedSafetensorsWriter(staging, shard_bytes)
    dtypes = set()
    for m in parameter_mappings(spec, include_mtp=bool(spec.mtp_num_layers)):
      array = np.asarray(flat[m.ours])
      dtypes.add(str(array.dtype))
      writer.add_all(to_hf(m, array, spec.gated_delta_net.key_head_dim))
    files = writer.close()
    hf_config = hf_config_from_config(config)
    hf_config["dtype"] = "bfloat16" if "bfloat16" in dtypes else sorted(dtypes)[0]
    with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as f:
      json.dump(hf_config, f, indent=2)
    os.rename(staging, output_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  log(f"wrote {len(files)} safetensors file(s) and config.json to {output_dir}")


def main(argv: Sequence[str]) -> int:
  config = load_config(argv)
  if not config.load_parameters_path:
    raise ConfigError("config key 'load_parameters_path' must name the orbax checkpoint to export")
  if not config.base_output_directory:
    raise ConfigError("config key 'base_output_directory' must name the HF directory to write")
  export(config, config.load_parameters_path, config.base_output_directory)
  return 0


if __name__ == "__main__":
  cli.run(main)
