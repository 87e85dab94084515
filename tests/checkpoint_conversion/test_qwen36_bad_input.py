"""Qwen3.6 conversion on wrong or unusual inputs: one line naming the culprit, nothing published; and block FP8
weights dequantised to bfloat16 against a float64 reference."""

import glob
import json
import os

import ml_dtypes
import numpy as np
import pytest

from maxtext.checkpoint_conversion import orbax_io, to_maxtext
from maxtext.checkpoint_conversion.safetensors_io import INDEX_FILE, write_safetensors
from maxtext.configs import load_config
from maxtext.utils import cli
from tests.assets.tiny_qwen36_checkpoint import write_folder
from tests.conftest import build_hf_tiny

LM = "model.language_model."


def convert_cli(capsys, hf_dir, out_dir, *extra):
  """The command-line entry point -> (exit code, stderr)."""
  capsys.readouterr()  # drop what building the inputs printed
  with pytest.raises(SystemExit) as exit_info:
    cli.run(to_maxtext.main, [f"hf_model_path={hf_dir}", f"base_output_directory={out_dir}", *extra])
  return exit_info.value.code, capsys.readouterr().err


def assert_one_line_and_nothing_published(err, out_dir):
  assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
  assert not os.path.exists(os.path.join(out_dir, "0")) and not glob.glob(os.path.join(out_dir, ".0.partial-*"))


@pytest.fixture
def copy_of(qwen36_irregular, tmp_path):
  """A fresh copy of the tiny non-periodic Qwen3.6 folder with `tensors` and config updates."""
  def make(tensors=None, config_updates=None, top_level=None):
    path = str(tmp_path / "hf")
    write_folder(qwen36_irregular.path, path, dict(qwen36_irregular.tensors if tensors is None else tensors),
                 config_updates)
    if top_level:
      config_path = os.path.join(path, "config.json")
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
      with open(config_path, "w", encoding="utf-8") as f:
        json.dump({**config, **top_level}, f)
    return path
  return make


def test_qwen3_next_checkpoint_with_the_qwen36_model_name(capsys, tmp_path):
  hf = build_hf_tiny("normalised_topk", str(tmp_path / "next"))
  code, err = convert_cli(capsys, hf.path, str(tmp_path / "out"), "model_name=qwen3.6-35b-a3b")
  assert code == 2
  assert "model_name=qwen3.6-35b-a3b does not match" in err
  assert "'model_family' is 'qwen3_5_moe' here but 'qwen3_next' in the checkpoint" in err
  assert_one_line_and_nothing_published(err, str(tmp_path / "out"))


def test_missing_shard(capsys, copy_of, qwen36_irregular, tmp_path):
  path = copy_of()
  os.remove(os.path.join(path, "model.safetensors"))
  names = sorted(qwen36_irregular.tensors)
  first = {n: qwen36_irregular.tensors[n] for n in names[:20]}
  write_safetensors(os.path.join(path, "model-00001-of-00002.safetensors"), first)
  weight_map = {n: "model-00001-of-00002.safetensors" if n in first else "model-00002-of-00002.safetensors"
                for n in names}
  with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
    json.dump({"weight_map": weight_map}, f)
  code, err = convert_cli(capsys, path, str(tmp_path / "out"))
  assert code == 1 and "model-00002-of-00002.safetensors' named in model.safetensors.index.json does not exist" in err
  assert_one_line_and_nothing_published(err, str(tmp_path / "out"))


@pytest.mark.parametrize("name, cut", [
    (f"{LM}layers.0.linear_attn.in_proj_z.weight", (slice(None, -1),)),
    (f"{LM}layers.1.mlp.experts.3.down_proj.weight", (slice(None), slice(None, -2))),
], ids=["split_gdn_projection", "expert"])
def test_tensor_of_the_wrong_shape(capsys, copy_of, qwen36_irregular, tmp_path, name, cut):
  tensors = dict(qwen36_irregular.tensors)
  want = tensors[name].shape
  tensors[name] = tensors[name][cut].copy()
  code, err = convert_cli(capsys, copy_of(tensors), str(tmp_path / "out"))
  assert code == 2 and f"tensor '{name}' has shape {tensors[name].shape}, expected {want}" in err
  assert_one_line_and_nothing_published(err, str(tmp_path / "out"))


def test_vision_only_folder(capsys, copy_of, qwen36_irregular, tmp_path):
  vision = {n: a for n, a in qwen36_irregular.tensors.items() if n.startswith("model.visual.")}
  assert vision
  code, err = convert_cli(capsys, copy_of(vision), str(tmp_path / "out"))
  assert code == 1 and "holds no language-model tensors (only" in err and "vision-tower tensors" in err
  assert_one_line_and_nothing_published(err, str(tmp_path / "out"))


def test_vision_encoder_config(capsys, copy_of, tmp_path):
  path = copy_of()
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump({"model_type": "qwen3_5_moe_vision", "depth": 1, "hidden_size": 16}, f)
  code, err = convert_cli(capsys, path, str(tmp_path / "out"))
  assert code == 2 and "model_type 'qwen3_5_moe_vision' is a vision encoder only" in err
  assert_one_line_and_nothing_published(err, str(tmp_path / "out"))


def test_unsupported_quantisation(capsys, copy_of, tmp_path):
  path = copy_of(top_level={"quantization_config": {"quant_method": "gptq", "bits": 4}})
  code, err = convert_cli(capsys, path, str(tmp_path / "out"))
  assert code == 2 and "quantization_config.quant_method 'gptq' is not supported" in err
  assert_one_line_and_nothing_published(err, str(tmp_path / "out"))


def test_unsupported_quantised_tensors_without_a_config(capsys, copy_of, qwen36_irregular, tmp_path):
  tensors = dict(qwen36_irregular.tensors)
  tensors[f"{LM}layers.0.linear_attn.out_proj.qweight"] = np.zeros((4, 4), np.int32)
  code, err = convert_cli(capsys, copy_of(tensors), str(tmp_path / "out"))
  assert code == 1 and f"tensor '{LM}layers.0.linear_attn.out_proj.qweight' belongs to a quantisation format" in err
  assert_one_line_and_nothing_published(err, str(tmp_path / "out"))


_QUANTISED = ("in_proj_qkv.weight", "in_proj_z.weight", "out_proj.weight", "q_proj.weight", "o_proj.weight",
              "gate_proj.weight", "up_proj.weight", "down_proj.weight")
BLOCK = (16, 8)


def _quantise(weight: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
  """-> (float8 weight, per-block scale_inv float32) with per-block scales that differ."""
  rows, cols = weight.shape
  scale = rng.uniform(0.5, 2.0, (-(-rows // BLOCK[0]), -(-cols // BLOCK[1]))).astype(np.float32) * 1e-3
  expanded = np.repeat(np.repeat(scale, BLOCK[0], 0), BLOCK[1], 1)[:rows, :cols]
  return (weight / expanded).astype(ml_dtypes.float8_e4m3fn), scale


def test_block_fp8_is_dequantised_to_bfloat16(copy_of, qwen36_irregular, tmp_path):
  rng = np.random.default_rng(0)
  tensors, reference = {}, {}
  for name, value in qwen36_irregular.tensors.items():
    if name.startswith(LM + "layers.") and name.endswith(_QUANTISED):
      tensors[name], tensors[name + "_scale_inv"] = _quantise(value, rng)
      expanded = np.repeat(np.repeat(tensors[name + "_scale_inv"].astype(np.float64), BLOCK[0], 0), BLOCK[1], 1)
      reference[name] = tensors[name].astype(np.float64) * expanded[: value.shape[0], : value.shape[1]]
    else:
      tensors[name] = value
  quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK)}
  path = copy_of(tensors, top_level={"quantization_config": quant})
  items = to_maxtext.convert(load_config([f"hf_model_path={path}", "scan_layers=false"]), path,
                             str(tmp_path / "out" / "0"), log=lambda *_: None)
  stored = orbax_io.restore_flat(items)
  o_proj = stored["decoder/layers_1/self_attn/o_proj/kernel"]  # [heads, head_dim, embed]
  assert o_proj.dtype == ml_dtypes.bfloat16
  expected = reference[f"{LM}layers.1.self_attn.o_proj.weight"].T.reshape(o_proj.shape)
  np.testing.assert_allclose(o_proj.astype(np.float64), expected, rtol=2**-8, atol=0)
  up = stored["decoder/layers_4/mlp/experts/up_proj"]  # [E, embed, mlp]
  for expert in range(up.shape[0]):
    expected = reference[f"{LM}layers.4.mlp.experts.{expert}.up_proj.weight"].T
    np.testing.assert_allclose(up[expert].astype(np.float64), expected, rtol=2**-8, atol=0)
  assert stored["decoder/layers_0/linear_attn/A_log"].dtype == np.float32  # unquantised tensors keep their dtype
