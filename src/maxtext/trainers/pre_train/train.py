"""Pretrain or finetune a Qwen3-Next model.

  python3 -m maxtext.trainers.pre_train.train src/maxtext/configs/base.yml run_name=RUN base_output_directory=DIR \
      [steps=... per_device_batch_size=... max_target_length=... dataset_type=synthetic|grain|hf ...]

A run resumes automatically from the latest checkpoint in DIR/RUN/checkpoints; finetuning is the same command with
`load_parameters_path=` (a converted or trained checkpoint). One metrics line per step; TensorBoard in DIR/RUN/tensorboard.
"""

from __future__ import annotations

from collections.abc import Sequence

from maxtext.configs import load_config
from maxtext.utils import cli, distributed


def main(argv: Sequence[str]) -> int:
  from maxtext.trainers.trainer import train  # noqa: PLC0415 - after cli.run has set up platforms and logging

  config = load_config(argv)
  distributed.initialize(config)  # several processes: join them before any device is used
  history = train(config)
  return 0 if all(m["loss"] == m["loss"] for m in history) else 1  # NaN loss fails the run


if __name__ == "__main__":
  cli.run(main)
