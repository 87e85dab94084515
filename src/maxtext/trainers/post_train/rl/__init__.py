"""RL post-training (GRPO, GSPO) with rollouts from our inference engine in the same process (docs/rl.md).

  python3 -m maxtext.trainers.post_train.rl src/maxtext/configs/base.yml run_name=RUN base_output_directory=DIR \
      rl_train_files=train.jsonl [rl_algorithm=grpo|gspo num_generations=8 rollout_batch_size=8 ...]
"""
