"""RL post-training of a Qwen3-Next model: GRPO or GSPO on prompt/label rows, rollouts by our engine.

  python3 -m maxtext.trainers.post_train.rl src/maxtext/configs/base.yml run_name=RUN base_output_directory=DIR \
      rl_train_files=train.jsonl [rl_eval_files=eval.jsonl rl_algorithm=grpo|gspo load_parameters_path=... ...]

One metrics line per step (reward, signal, length, loss, clip fraction, KL, train/rollout mismatch, throughput);
TensorBoard in DIR/RUN/tensorboard; checkpoints (state, data position) in DIR/RUN/checkpoints, resumed automatically.
"""

from __future__ import annotations

from collections.abc import Sequence

from maxtext.configs import ConfigError, load_config
from maxtext.utils import cli, distributed


def main(argv: Sequence[str]) -> int:
  import jax  # noqa: PLC0415 - after cli.run set up platforms

  from maxtext.trainers.post_train.rl.loop import rl_train  # noqa: PLC0415

  config = load_config(argv)
  distributed.initialize(config)  # several processes: join them before any device is used
  if jax.process_count() > 1:
    raise ConfigError("RL runs as one process for now: its rollouts go through the engine, which feeds one"
                      f" process's devices ({jax.process_count()} processes were launched); run it on one host")
  history = rl_train(config)
  finite = all(m.get("policy_loss", 0.0) == m.get("policy_loss", 0.0) for m in history)
  return 0 if finite else 1  # a NaN loss fails the run


if __name__ == "__main__":
  cli.run(main)
