"""TPU slice names -> chips, libtpu layouts and HBM; mesh sizes against the slice; clear errors for bad names."""

import pytest

from maxtext.configs import ConfigError, load_config
from maxtext.utils.topology import GIB, TopologyError, mesh_shape, parse_topology


@pytest.mark.parametrize(
    "name,chips,layout,hbm_gib",
    [
        ("v5p-8", 4, "v5p:2x2x1", 95),  # v5p-N counts TensorCores: 2 per chip
        ("v5p-64", 32, "v5p:4x4x2", 95),
        ("v5p-128", 64, "v5p:4x4x4", 95),
        ("v5e-256", 256, "v5e:16x16", 16),  # v5e-N and v6e-N count chips
        ("v6e-256", 256, "v6e:16x16", 32),
        ("v6e-8", 8, "v6e:4x2", 32),
    ],
)
def test_names_give_chips_layout_and_hbm(name, chips, layout, hbm_gib):
  topology = parse_topology(name)
  assert (topology.chips, topology.libtpu_name, topology.hbm_bytes) == (chips, layout, hbm_gib * GIB)


@pytest.mark.parametrize(
    "name,culprit",
    [
        ("v5p-63", "counts TensorCores, 2 per chip"),
        ("v5e-24", "power-of-two chip count"),
        ("v5e-512", "up to 256"),
        ("v7x-8", "unknown TPU generation 'v7x'"),
        ("tpu-v5p-64", "unknown TPU topology"),
        ("v5p-4", "smaller than one host"),
    ],
)
def test_bad_names_say_why(name, culprit):
  with pytest.raises(TopologyError, match=culprit):
    parse_topology(name)


def test_bad_name_is_a_config_error_at_load():
  with pytest.raises(ConfigError, match="config key 'compile_topology': unknown TPU topology 'v5p64'"):
    load_config(overrides={"compile_topology": "v5p64"})


def test_mesh_sizes_fill_the_slice():
  ici = {"data": 1, "fsdp": -1, "tensor": 2, "expert": 1}
  dcn = {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1}
  assert mesh_shape(ici, dcn, devices_per_slice=32, num_slices=2) == ((1, 16, 1, 2, 1), (2, 1, 1, 1, 1))


@pytest.mark.parametrize(
    "ici,culprit",
    [
        ({"data": 1, "fsdp": 3, "tensor": -1, "expert": 1}, r"product \(3\) does not divide the 32 devices per slice"),
        ({"data": 1, "fsdp": 8, "tensor": 2, "expert": 1}, "multiply to 16, but there are 32 devices per slice"),
    ],
)
def test_mesh_that_does_not_fit_names_the_keys(ici, culprit):
  with pytest.raises(TopologyError, match=culprit):
    mesh_shape(ici, {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}, devices_per_slice=32, num_slices=1)
