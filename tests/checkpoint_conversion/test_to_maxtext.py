"""to_maxtext on damaged or mismatched inputs: one clear line naming the culprit, and no checkpoint left behind.
Also: MTP weights convert when present, and an interrupted conversion publishes nothing."""

import glob
import json
import os
import shutil

import jax
from flax import linen as nn
import numpy as np
import pytest

from maxtext.checkpoint_conversion import orbax_io, to_maxtext
from maxtext.checkpoint_conversion.param_mapping import parameter_mappings, to_hf
from maxtext.checkpoint_conversion.safetensors_io import INDEX_FILE, write_safetensors
from maxtext.configs import load_config
from maxtext.models import params as model_params
from maxtext.models.spec import ModelSpec
from maxtext.utils import cli
from tests.conftest import build_hf_tiny


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
  return build_hf_tiny("normalised_topk", str(tmp_path_factory.mktemp("hf_src")))


@pytest.fixture
def hf_dir(hf_source, tmp_path):
  """A fresh copy of the tiny HF checkpoint that a test may damage."""
  path = str(tmp_path / "hf")
  shutil.copytree(hf_source.path, path)
  return path


def tensors_of(hf_dir):
  from safetensors.numpy import load_file

  return load_file(os.path.join(hf_dir, "model.safetensors"))


def convert_cli(capsys, hf_dir, out_dir, *extra):
  """Run the command-line entry point; returns (exit code, stderr)."""
  argv = [f"hf_model_path={hf_dir}", f"base_output_directory={out_dir}", *extra]
  with pytest.raises(SystemExit) as exit_info:
    cli.run(to_maxtext.main, argv)
  return exit_info.value.code, capsys.readouterr().err


def assert_nothing_published(out_dir):
  assert not os.path.exists(os.path.join(out_dir, "0"))
  assert not glob.glob(os.path.join(out_dir, ".0.partial-*"))


def test_converts_cleanly(capsys, hf_dir, tmp_path):
  code, err = convert_cli(capsys, hf_dir, str(tmp_path / "out"))
  assert code == 0, err
  assert os.path.isdir(tmp_path / "out" / "0" / "items")


def test_missing_tensor(capsys, hf_dir, tmp_path):
  tensors = tensors_of(hf_dir)
  del tensors["model.layers.2.linear_attn.dt_bias"]
  write_safetensors(os.path.join(hf_dir, "model.safetensors"), tensors)
  code, err = convert_cli(capsys, hf_dir, str(tmp_path / "out"))
  assert code == 2
  assert err.strip() == "error: checkpoint is missing tensor 'model.layers.2.linear_attn.dt_bias' (1 missing in all)"
  assert_nothing_published(str(tmp_path / "out"))


def test_unexpected_tensor(capsys, hf_dir, tmp_path):
  tensors = tensors_of(hf_dir)
  tensors["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
  write_safetensors(os.path.join(hf_dir, "model.safetensors"), tensors)
  code, err = convert_cli(capsys, hf_dir, str(tmp_path / "out"))
  assert code == 2 and "unexpected tensor 'model.layers.0.mlp.extra.weight'" in err
  assert len(err.strip().splitlines()) == 1


def test_wrong_shape(capsys, hf_dir, tmp_path):
  tensors = tensors_of(hf_dir)
  tensors["model.layers.1.self_attn.o_proj.weight"] = tensors["model.layers.1.self_attn.o_proj.weight"][:, :-1].copy()
  write_safetensors(os.path.join(hf_dir, "model.safetensors"), tensors)
  code, err = convert_cli(capsys, hf_dir, str(tmp_path / "out"))
  assert code == 2
  assert "tensor 'model.layers.1.self_attn.o_proj.weight' has shape (48, 95), expected (48, 96)" in err


def test_named_model_must_match_the_checkpoint(capsys, hf_dir, tmp_path):
  code, err = convert_cli(capsys, hf_dir, str(tmp_path / "out"), "model_name=qwen3-next-tiny")
  assert code == 2
  assert "model_name=qwen3-next-tiny does not match" in err and "'vocab_size' is 512 here but 320" in err
  assert_nothing_published(str(tmp_path / "out"))


def test_truncated_shard(capsys, hf_dir, tmp_path):
  path = os.path.join(hf_dir, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 1000)
  code, err = convert_cli(capsys, hf_dir, str(tmp_path / "out"))
  assert code == 1
  assert f"'{path}' is truncated: tensor" in err
  assert_nothing_published(str(tmp_path / "out"))


def test_corrupt_header(capsys, hf_dir, tmp_path):
  path = os.path.join(hf_dir, "model.safetensors")
  with open(path, "r+b") as f:
    f.seek(8)
    f.write(b"\xff\xfe garbage")
  code, err = convert_cli(capsys, hf_dir, str(tmp_path / "out"))
  assert code == 1 and f"'{path}' has a corrupt safetensors header" in err


def test_index_naming_a_missing_shard(capsys, hf_dir, tmp_path):
  tensors = tensors_of(hf_dir)
  os.remove(os.path.join(hf_dir, "model.safetensors"))
  names = sorted(tensors)
  write_safetensors(os.path.join(hf_dir, "model-00001-of-00002.safetensors"), {n: tensors[n] for n in names[:10]})
  weight_map = {n: "model-00001-of-00002.safetensors" for n in names[:10]}
  weight_map.update({n: "model-00002-of-00002.safetensors" for n in names[10:]})
  with open(os.path.join(hf_dir, INDEX_FILE), "w", encoding="utf-8") as f:
    json.dump({"weight_map": weight_map}, f)
  code, err = convert_cli(capsys, hf_dir, str(tmp_path / "out"))
  assert code == 1 and "model-00002-of-00002.safetensors' named in model.safetensors.index.json does not exist" in err


def test_sharded_checkpoint_with_index_converts(hf_dir, tmp_path):
  tensors = tensors_of(hf_dir)
  os.remove(os.path.join(hf_dir, "model.safetensors"))
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for file, shard_names in shards.items():
    write_safetensors(os.path.join(hf_dir, file), {n: tensors[n] for n in shard_names})
  with open(os.path.join(hf_dir, INDEX_FILE), "w", encoding="utf-8") as f:
    json.dump({"weight_map": {n: file for file, ns in shards.items() for n in ns}}, f)
  items = to_maxtext.convert(load_config([f"hf_model_path={hf_dir}"]), hf_dir, str(tmp_path / "out" / "0"),
                             log=lambda *_: None)
  assert len(orbax_io.restore_flat(items)) > 0


def test_existing_output_is_not_overwritten(capsys, hf_dir, tmp_path):
  os.makedirs(tmp_path / "out" / "0")
  code, err = convert_cli(capsys, hf_dir, str(tmp_path / "out"))
  assert code == 1 and "already exists" in err


def test_unwritable_output(capsys, hf_dir, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  code, err = convert_cli(capsys, hf_dir, str(blocker / "out"))
  assert code == 1 and f"cannot create output directory '{blocker / 'out'}'" in err


def test_missing_config_json(capsys, hf_dir, tmp_path):
  os.remove(os.path.join(hf_dir, "config.json"))
  code, err = convert_cli(capsys, hf_dir, str(tmp_path / "out"))
  assert code == 2 and f"hf_model_path '{hf_dir}' has no config.json" in err


def test_interrupted_conversion_publishes_nothing(hf_dir, tmp_path, monkeypatch):
  calls = {"n": 0}
  original_write = orbax_io.StreamingCheckpointWriter.write

  def failing_write(self, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 20:
      raise KeyboardInterrupt
    return original_write(self, *args, **kwargs)

  monkeypatch.setattr(orbax_io.StreamingCheckpointWriter, "write", failing_write)
  with pytest.raises(KeyboardInterrupt):
    to_maxtext.convert(load_config([f"hf_model_path={hf_dir}"]), hf_dir, str(tmp_path / "out" / "0"),
                       log=lambda *_: None)
  assert_nothing_published(str(tmp_path / "out"))


def test_mtp_weights_convert_when_present(hf_dir, tmp_path):
  """The hub checkpoints carry mtp.* tensors (transformers drops them on save): they must land in mtp/."""
  config_path = os.path.join(hf_dir, "config.json")
  with open(config_path, encoding="utf-8") as f:
    hf_config = json.load(f)
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump({**hf_config, "mtp_num_hidden_layers": 1}, f)
  config = load_config([f"hf_model_path={hf_dir}", "scan_layers=false"])
  assert config.mtp_num_layers == 1
  spec = ModelSpec.from_config(config)
  fresh = model_params.flatten(nn.unbox(model_params.init_variables(spec, jax.random.key(3)))["params"])
  mtp_params = {path: np.asarray(value) for path, value in fresh.items() if path.startswith("mtp/")}
  tensors = tensors_of(hf_dir)
  for mapping in parameter_mappings(spec):
    if mapping.ours.startswith("mtp/"):
      tensors.update(to_hf(mapping, mtp_params[mapping.ours]))
  write_safetensors(os.path.join(hf_dir, "model.safetensors"), tensors)
  items = to_maxtext.convert(config, hf_dir, str(tmp_path / "out" / "0"), log=lambda *_: None)
  stored = orbax_io.restore_flat(items)
  for path, value in mtp_params.items():
    np.testing.assert_array_equal(stored[path], value)
  assert orbax_io.read_model_config(items)["model"]["mtp_num_layers"] == 1


def test_named_model_that_matches_converts(capsys, tmp_path):
  """A checkpoint of exactly the qwen3-next-tiny shape converts with model_name=qwen3-next-tiny."""
  import torch
  from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

  from maxtext.configs.hf_config import hf_config_from_config

  torch.manual_seed(0)
  hf_config = hf_config_from_config(load_config(["model_name=qwen3-next-tiny"]))
  Qwen3NextForCausalLM(Qwen3NextConfig(**hf_config)).save_pretrained(str(tmp_path / "hf"))
  code, err = convert_cli(capsys, str(tmp_path / "hf"), str(tmp_path / "out"), "model_name=qwen3-next-tiny")
  assert code == 0, err
  assert orbax_io.read_model_config(str(tmp_path / "out" / "0" / "items"))["model"]["vocab_size"] == 512
