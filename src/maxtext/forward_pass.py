"""Build a model from a config, run one forward pass on random tokens, print logits statistics.

  python3 -m maxtext.forward_pass src/maxtext/configs/base.yml [key=value ...]

Parameters are freshly initialised (seed `init_weights_seed`) and laid out on the mesh by the sharding rules.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maxtext import sharding
from maxtext.configs import load_config
from maxtext.models import params as model_params
from maxtext.models.qwen3_next import Qwen3NextForCausalLM
from maxtext.models.spec import ModelSpec
from maxtext.utils import cli


def main(argv: Sequence[str]) -> int:
  config = load_config(argv)
  spec = ModelSpec.from_config(config)
  mesh = sharding.make_mesh(sharding.config_parallelism(config))
  batch = max(1, int(config.per_device_batch_size * jax.device_count()))
  length = config.max_target_length
  print(f"model {config.model_name}: {spec.num_layers} layers, scan_layers={spec.scan_layers}, dtype={config.dtype},"
        f" weights {config.weight_dtype}; mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()}"
        " device(s)")

  start = time.perf_counter()
  rng = jax.random.key(config.init_weights_seed)
  variables, _ = sharding.init_sharded(
      lambda r: model_params.init_variables(spec, r), model_params.abstract_variables(spec), mesh, rng
  )
  num_params = sum(x.size for x in jax.tree.leaves(variables))
  print(f"initialised {num_params:,} parameters in {time.perf_counter() - start:.1f}s")

  tokens = jax.random.randint(jax.random.key(1), (batch, length), 0, config.vocab_size)
  with sharding.activate(mesh):
    forward = jax.jit(lambda v, t: Qwen3NextForCausalLM(spec).apply(v, t))
    start = time.perf_counter()
    out = jax.block_until_ready(forward(variables, tokens))
  elapsed = time.perf_counter() - start
  logits = np.asarray(out.logits.astype(jnp.float32))
  print(f"forward pass on tokens [{batch}, {length}] took {elapsed:.2f}s (including compilation)")
  print(f"logits {list(logits.shape)} {out.logits.dtype}: mean {logits.mean():.6f} std {logits.std():.6f}"
        f" min {logits.min():.6f} max {logits.max():.6f} finite {bool(np.isfinite(logits).all())}")
  print(f"moe load-balancing loss {float(out.aux_loss):.6f}; mtp steps {len(out.mtp_logits)}")
  return 0 if np.isfinite(logits).all() else 1


if __name__ == "__main__":
  cli.run(main)
