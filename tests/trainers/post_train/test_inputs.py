"""Rewards, prompt files and packing; bad input stops the RL command with one line naming the culprit."""

import json
import os

import numpy as np
import pytest

from maxtext.configs import ConfigError, load_config
from maxtext.trainers.post_train.rl import rewards
from maxtext.trainers.post_train.rl.__main__ import main
from maxtext.trainers.post_train.rl.data import PromptIterator, load_prompts
from maxtext.trainers.post_train.rl.packing import pack
from maxtext.utils import cli
from tests.trainers.post_train.toy_task import TOY_MODEL, build_task

BASE_YML = os.path.join(os.path.dirname(__file__), "..", "..", "..", "src", "maxtext", "configs", "base.yml")


@pytest.mark.parametrize("response,label,expected", [
    ("so the answer is \\boxed{42}.", "42", 1.0),
    ("\\boxed{1,000} then 7", "1000", 1.0),  # the boxed answer wins over a later number
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),  # nested braces
    ("we get 3.50 apples", "3.5", 1.0),  # last number, trailing zero
    ("first 5 then 6", "5", 0.0),
    ("no answer here", "5", 0.0),
    ("\\boxed{ $12$ }", "12", 1.0),
    ("\\boxed{12", "12", 1.0),  # unclosed box: falls back to the last number
    ("-4", "-4", 1.0),
])
def test_math_reward(response, label, expected):
  assert rewards.math_reward(response, label) == expected


def test_user_reward_function_and_unknown_names():
  fn = rewards.load_reward("tests.trainers.post_train.toy_task:length_reward")
  assert fn("abc", "x") == 3.0
  with pytest.raises(ConfigError, match="unknown reward function 'mathh'"):
    rewards.load_reward("mathh")
  with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
    rewards.load_reward("no_such_module:f")
  with pytest.raises(ConfigError, match="has no function 'nope'"):
    rewards.load_reward("tests.trainers.post_train.toy_task:nope")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  return build_task(str(tmp_path_factory.mktemp("toy")))


def test_prompts_from_jsonl_and_parquet_and_chat_messages(task, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  from transformers import AutoTokenizer

  from maxtext.assets.data.build_tiny_tokenizer import TINY_TOKENIZER_DIR

  config = load_config(overrides={**TOY_MODEL, **task})
  tokenizer = AutoTokenizer.from_pretrained(task["tokenizer_path"])
  rows = load_prompts(config, tokenizer, task["rl_train_files"], "rl_train_files")
  assert len(rows) == 40 and rows[0].tokens == (2, 12) and rows[0].label == "0"  # "0=" -> ids of "0", "="
  parquet = str(tmp_path / "rows.parquet")
  pq.write_table(pa.table({"prompt": ["3=", "9="], "label": [3, 9]}), parquet)
  assert [r.label for r in load_prompts(config, tokenizer, parquet, "rl_train_files")] == ["3", "9"]
  chat_file = tmp_path / "chat.jsonl"
  chat_file.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "label": "1"}) + "\n")
  chat_config = load_config(overrides={"max_response_length": 8, "rl_train_files": str(chat_file)})
  chat_tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
  [chat] = load_prompts(chat_config, chat_tokenizer, str(chat_file), "rl_train_files")
  text = chat_tokenizer.decode(list(chat.tokens))
  assert text.startswith("<|im_start|>user\nhi<|im_end|>") and text.endswith("<|im_start|>assistant\n")


def test_prompt_iterator_resumes_where_it_was(task):
  prompts = list(range(7))
  first = PromptIterator(prompts, seed=3)
  first.take(5)
  state = first.get_state()
  expected = first.take(6)  # crosses into the next (reshuffled) epoch
  second = PromptIterator(prompts, seed=3)
  second.set_state(state)
  assert second.take(6) == expected
  assert sorted(PromptIterator(prompts, seed=3).take(7)) == prompts  # an epoch is a permutation


def test_packing_masks_only_response_tokens():
  prompts, responses = [(5, 6, 7), (8,), (9, 10)], [[1, 2], [3], [4, 4, 4]]
  logps = [[-0.1, -0.2], [-0.3], [-0.4, -0.5, -0.6]]
  batches = pack(prompts, responses, logps, np.array([1.0, -1.0, 0.5], np.float32), rows_per_batch=2, length=6)
  assert len(batches) == 1
  b = batches[0]
  for row in range(2):
    for segment in set(b["segment_ids"][row]) - {0}:
      where = b["segment_ids"][row] == segment
      inputs, targets, mask = b["inputs"][row][where], b["targets"][row][where], b["loss_mask"][row][where]
      index = next(i for i, p in enumerate(prompts) if list(inputs[: len(p)]) == list(p))
      full = list(prompts[index]) + responses[index]
      assert list(inputs) == full[:-1] and list(targets) == full[1:]
      assert list(b["positions"][row][where]) == list(range(len(full) - 1))
      assert list(targets[mask > 0]) == responses[index]  # the loss sees exactly the sampled tokens
      np.testing.assert_allclose(b["rollout_logp"][row][where][mask > 0], logps[index])
  assert b["loss_mask"].sum() == 6 and len(set(b["seq_ids"][b["loss_mask"] > 0])) == 3


# ---- acceptance 5: one line each ----
def run_cli(capsys, *overrides) -> tuple[int, str]:
  with pytest.raises(SystemExit) as exit_info:
    cli.run(main, [BASE_YML, *overrides])
  err = capsys.readouterr().err.strip()
  return exit_info.value.code, err


def toy_args(task, tmp_path, **extra):
  values = {**TOY_MODEL, **task, "base_output_directory": str(tmp_path), "run_name": "bad", **extra}
  return [f"{k}={v}" for k, v in values.items()]


@pytest.mark.parametrize("row,missing", [({"label": "1"}, "prompt"), ({"prompt": "1="}, "label")])
def test_rows_without_prompt_or_label(task, tmp_path, capsys, row, missing):
  data = tmp_path / "rows.jsonl"
  data.write_text(json.dumps({"prompt": "2=", "label": "2"}) + "\n" + json.dumps(row) + "\n")
  code, err = run_cli(capsys, *toy_args(task, tmp_path, rl_train_files=str(data)))
  assert code == 1 and err.count("\n") == 0
  assert err == f"error: '{data}' row 2 has no '{missing}' (RL rows need 'prompt' and 'label'; it has" \
                f" {next(iter(row))})"


def test_unknown_reward_function(task, tmp_path, capsys):
  code, err = run_cli(capsys, *toy_args(task, tmp_path, rl_reward="exact_match"))
  assert code == 2 and err.count("\n") == 0
  assert err.startswith("error: config key 'rl_reward': unknown reward function 'exact_match'")


def test_group_size_that_does_not_divide_the_batch(task, tmp_path, capsys):
  code, err = run_cli(capsys, *toy_args(task, tmp_path, num_generations=3, rl_global_batch_size=8))
  assert code == 2 and err.count("\n") == 0
  assert err.startswith("error: config key 'rl_global_batch_size' (8) must be a multiple of num_generations (3)")


def test_response_length_beyond_max_target_length(task, tmp_path, capsys):
  code, err = run_cli(capsys, *toy_args(task, tmp_path, max_response_length=32))
  assert code == 2 and err == ("error: config key 'max_response_length' (32) must be below max_target_length (32):"
                               " each prompt + response must fit in one row")
  code, err = run_cli(capsys, *toy_args(task, tmp_path, max_response_length=31))  # prompt "0=" is 2 tokens
  assert code == 2 and err.count("\n") == 0
  assert err.endswith("row 1: 2 prompt tokens + max_response_length (31) exceed max_target_length (32)")


class ScriptedRoller:
  """Stands in for the engine in `collect`: each call returns the next scripted rewards (one row per group)."""

  def __init__(self, rounds):
    self.rounds, self.calls = list(rounds), 0

  def sample(self, prompts, group_size, seed):
    from maxtext.trainers.post_train.rl.rollout import Rollout

    rewards = np.asarray(self.rounds[self.calls], np.float32).reshape(-1)
    self.calls += 1
    n = len(prompts) * group_size
    return Rollout(group_size, [tuple(p.tokens) for p in prompts for _ in range(group_size)],
                   [[1, 2]] * n, [[-1.0, -1.0]] * n, rewards, 1.0)


@pytest.mark.parametrize("dynamic", [False, True])
def test_dynamic_sampling_drops_groups_without_signal_and_refills(task, dynamic):
  from maxtext.trainers.post_train.rl.data import Prompt
  from maxtext.trainers.post_train.rl.loop import collect

  config = load_config(overrides={**TOY_MODEL, **task, "rollout_batch_size": 3, "num_generations": 2,
                                  "rl_dynamic_sampling": dynamic, "rl_dynamic_sampling_max_rounds": 2})
  prompts = PromptIterator([Prompt((i,), str(i), "") for i in range(100)], seed=0)
  roller = ScriptedRoller([[[1, 0], [1, 1], [0, 0]], [[0, 0], [0, 1], [0, 0]], [[1, 0], [0, 1], [1, 0]]])
  kept, stats = collect(config, roller, prompts, seed=0)
  assert stats["signal_fraction"] == pytest.approx(1 / 3) and stats["reward_mean"] == pytest.approx(0.5)
  if not dynamic:
    assert roller.calls == 1 and kept.rewards.tolist() == [1, 0, 1, 1, 0, 0]
  else:  # round 1 keeps group 0, round 2 group 1, round 3 fills the third place (and drops the rest)
    assert roller.calls == 3 and kept.rewards.tolist() == [1, 0, 0, 1, 1, 0]
    assert kept.num_responses == 6 and kept.groups_with_signal().all()
