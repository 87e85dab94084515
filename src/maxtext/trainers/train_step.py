"""The jitted train step, the training state it updates and their layouts on a mesh (see `build_training`).

State: {'step': int32 [], 'params': model parameters, 'opt_state': optax state}. Parameters take the sharding of
their logical axes (maxtext.sharding.RULES); each optimizer leaf that mirrors a parameter (Adam's moments) takes that
parameter's sharding, the rest (counters) is replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from maxtext import sharding
from maxtext.configs import Config
from maxtext.models import params as model_params
from maxtext.models.qwen3_next import Qwen3NextForCausalLM
from maxtext.models.spec import ModelSpec
from maxtext.trainers import mesh as train_mesh
from maxtext.trainers.loss import training_loss
from maxtext.trainers.optimizer import build_optimizer, learning_rate_schedule

# Every batch holds these [B, T] arrays: tokens in, next tokens out, per-document positions, packed-document ids
# (0 = padding) and the loss weight of each target (0 for padding, prompts in SFT, ...).
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
_BATCH_DTYPES = {"loss_mask": jnp.float32}


class _OnMesh:
  """A jitted function whose tracing (call or lower) happens with the mesh and logical rules active."""

  def __init__(self, jitted, mesh):
    self._jitted, self._mesh = jitted, mesh

  def __call__(self, *args):
    with sharding.activate(self._mesh):
      return self._jitted(*args)

  def lower(self, *args):
    with sharding.activate(self._mesh):
      return self._jitted.lower(*args)


@dataclasses.dataclass(frozen=True)
class Training:
  mesh: Any  # jax.sharding.Mesh | AbstractMesh
  abstract_state: Any  # pytree of ShapeDtypeStruct with .sharding (params + optimizer state + step)
  abstract_batch: dict[str, jax.ShapeDtypeStruct]  # BATCH_KEYS, [global batch, max_target_length], sharded
  train_step: Callable  # jitted (state, batch) -> (state, metrics); state donated
  init_state: Callable  # jitted (rng) -> fresh state, born sharded
  state_from_params: Callable  # jitted (params) -> state at step 0 around given parameters
  spec: ModelSpec
  optimizer: optax.GradientTransformation
  global_batch_size: int

  @property
  def state_shardings(self) -> Any:
    return jax.tree.map(lambda a: a.sharding, self.abstract_state)

  @property
  def param_shardings(self) -> Any:
    return self.state_shardings["params"]


def _mirror_parameter_shardings(tree: Any, params: Any, param_shardings: Any, replicated: NamedSharding) -> Any:
  """A sharding per leaf of `tree`: the parameter's whose path ends the leaf's path (same shape), else replicated."""
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_shardings = jax.tree.leaves(param_shardings)
  by_path = {
      jax.tree_util.keystr(path): (param.shape, sharding_)
      for (path, param), sharding_ in zip(flat_params, flat_shardings)
  }

  def choose(path, leaf):
    for start in range(len(path)):
      match = by_path.get(jax.tree_util.keystr(path[start:]))
      if match is not None and tuple(match[0]) == tuple(leaf.shape):
        return match[1]
    return replicated

  return jax.tree_util.tree_map_with_path(choose, tree)


def _uses_mtp(config: Config) -> bool:
  return config.mtp_num_layers > 0 and config.mtp_loss_scaling_factor > 0


def build_training(config: Config, mesh) -> Training:
  """Everything a run needs to train `config` on `mesh`, without allocating: abstract state and batch with their
  shardings, and jitted init / step functions. Works with an AbstractMesh or topology devices (ahead-of-time
  compilation: `training.train_step.lower(training.abstract_state, training.abstract_batch).compile()`)."""
  spec = ModelSpec.from_config(config)
  model = Qwen3NextForCausalLM(spec)
  optimizer = build_optimizer(config)
  schedule = learning_rate_schedule(config)
  batch_size = train_mesh.global_batch_size(config, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())

  boxed = model_params.abstract_variables(spec)["params"]
  param_shardings = sharding.logical_sharding(boxed, mesh)
  abstract_params = nn.unbox(boxed)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  shardings = {
      "step": replicated,
      "params": param_shardings,
      "opt_state": _mirror_parameter_shardings(abstract_opt, abstract_params, param_shardings, replicated),
  }
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params, "opt_state": abstract_opt},
      shardings,
  )
  batch_layout = train_mesh.batch_sharding(mesh)
  shape = (batch_size, config.max_target_length)
  abstract_batch = {
      key: jax.ShapeDtypeStruct(shape, _BATCH_DTYPES.get(key, jnp.int32), sharding=batch_layout) for key in BATCH_KEYS
  }

  def state_from_params(params):
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}

  def init_state(rng):
    return state_from_params(nn.unbox(model_params.init_variables(spec, rng))["params"])

  with_mtp = _uses_mtp(config)

  def loss_fn(params, batch):
    output = model.apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"], with_mtp=with_mtp
    )
    return training_loss(output, batch, config.load_balance_loss_weight, config.mtp_loss_scaling_factor)

  def train_step(state, batch):
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {
        "loss": loss,
        **parts,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state["step"]),
    }
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  jitted_step = jax.jit(
      train_step, in_shardings=(shardings, batch_layout), out_shardings=(shardings, replicated), donate_argnums=(0,)
  )
  return Training(
      mesh=mesh,
      abstract_state=abstract_state,
      abstract_batch=abstract_batch,
      train_step=_OnMesh(jitted_step, mesh),
      init_state=_OnMesh(jax.jit(init_state, out_shardings=shardings), mesh),
      state_from_params=_OnMesh(
          jax.jit(state_from_params, in_shardings=(param_shardings,), out_shardings=shardings), mesh
      ),
      spec=spec,
      optimizer=optimizer,
      global_batch_size=batch_size,
  )


def place_params(params: Any, training: Training) -> Any:
  """Host (numpy) parameters -> device arrays laid out like the training state's parameters."""
  return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), params, training.param_shardings)
