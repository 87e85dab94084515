"""Acceptance: lm-eval (`local-completions`, both tokenizer backends) against the real server on MMLU-format
subjects whose text holds U+0085 and split UTF-8 characters picks the same answers, with the same per-choice
scores, as `maxtext.eval.mmlu`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from maxtext.eval import mmlu
from maxtext.eval.completions_client import CompletionsScorer
from maxtext.eval.mmlu_data import load_split
from tests.serving.live_server import REPO

QUESTIONS = {
    "management": [("Who\u0085leads a team?", ["a manager", "a clerk", "a client", "nobody"], 0),
                   ("Span of control means\u0085what?", ["reports per manager", "budget", "office size", "pay"], 0)],
    "sociology": [("Which is a norm?", ["queueing", "鱻 rain", "𝔘 tides", "gravity"], 0),
                  ("A −5 score is\u0085?", ["negative", "positive", "zero", "undefined"], 0)],
}
TASK_YAML = """task: mmlu_tiny_{subject}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\n\\
D. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
  root = tmp_path_factory.mktemp("mmlu_tiny")
  for subject, rows in QUESTIONS.items():
    path = root / subject / "test.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"question": q, "subject": subject, "choices": c, "answer": a},
                                       ensure_ascii=False) + "\n" for q, c, a in rows), encoding="utf-8")
    (root / f"{subject}.yaml").write_text(TASK_YAML.format(subject=subject, path=path), encoding="utf-8")
  return root


@pytest.fixture(scope="module")
def ours(real, tasks):
  questions = load_split(str(tasks), "test")
  outcomes = mmlu.evaluate(questions, {}, CompletionsScorer(real.base_url), concurrency=4)
  return {(o.question.subject, o.question.question): o for o in outcomes}


def test_lm_eval_agrees_with_the_evaluator(real, tasks, ours):
  from maxtext.assets.tokenizers import ensure_qwen3_tokenizer

  names = ",".join(f"mmlu_tiny_{s}" for s in QUESTIONS)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", "tests.eval.lm_eval_runner", real.base_url, real.model_id,
                           str(tasks), names, "remote,huggingface", ensure_qwen3_tokenizer()],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  line = next((l for l in result.stdout.splitlines() if l.startswith("RESULT ")), None)
  assert result.returncode == 0 and line, result.stderr[-4000:]
  by_backend = json.loads(line.removeprefix("RESULT "))
  assert sorted(by_backend) == ["huggingface", "remote"]
  for theirs in by_backend.values():
    assert sorted(theirs) == sorted(f"mmlu_tiny_{s}" for s in QUESTIONS)
    for subject in QUESTIONS:
      samples = theirs[f"mmlu_tiny_{subject}"]
      assert len(samples) == len(QUESTIONS[subject])
      for sample in samples:
        outcome = ours[(subject, sample["question"])]
        np.testing.assert_allclose(sample["scores"], outcome.scores, atol=1e-4)
        assert int(np.argmax(sample["scores"])) == outcome.predicted
        assert sample["acc"] == float(outcome.correct)
