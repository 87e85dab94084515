"""Parameter trees of a model: abstract shapes, initialisation, flat '/' paths."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from maxtext.models.qwen3_next import Qwen3NextForCausalLM
from maxtext.models.spec import ModelSpec

_INIT_LENGTH = 8  # any length works: parameter shapes do not depend on it


def init_variables(spec: ModelSpec, rng: jax.Array) -> dict[str, Any]:
  """Boxed (nn.Partitioned) parameters of a fresh model."""
  tokens = jnp.zeros((1, _INIT_LENGTH), jnp.int32)
  return Qwen3NextForCausalLM(spec).init(rng, tokens)


def abstract_variables(spec: ModelSpec) -> dict[str, Any]:
  """Boxed ShapeDtypeStructs of the parameters, without allocating them."""
  return jax.eval_shape(lambda: init_variables(spec, jax.random.key(0)))


def flat_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
  """'/'-path -> shape of every parameter in `spec`'s layout."""
  params = nn.unbox(abstract_variables(spec))["params"]
  return {path: tuple(leaf.shape) for path, leaf in flatten(params).items()}


def unscanned(spec: ModelSpec) -> ModelSpec:
  return dataclasses.replace(spec, scan_layers=False)


def flatten(tree: dict[str, Any]) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(flat, sep="/")
