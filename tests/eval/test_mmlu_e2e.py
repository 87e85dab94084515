"""Acceptance: the documented evaluator command on the shipped sample against the real server (tiny converted HF
checkpoint); every question's answer scores equal the HF torch model's log-probs of " A".." D"."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from maxtext.eval.mmlu_data import load_split
from maxtext.eval.mmlu_prompt import CONTINUATIONS, build_prompt
from tests.serving import hf_reference
from tests.serving.live_server import REPO

SAMPLE = os.path.join(REPO, "src", "maxtext", "assets", "mmlu_sample")


def test_zero_shot_mmlu_on_the_sample_matches_hf(real, tokenizer, tmp_path):
  output = tmp_path / "mmlu.json"
  result = subprocess.run(
      [sys.executable, "-m", "maxtext.eval.mmlu", "--server", real.base_url, "--data", SAMPLE, "--shots", "0",
       "--output", str(output)],
      cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads(output.read_text())
  questions = load_split(SAMPLE, "test")
  letter_ids = [tokenizer.encode(c)[0] for c in CONTINUATIONS]
  near_ties = 0
  for question, prediction in zip(questions, record["predictions"], strict=True):
    assert prediction["question"] == question.question
    ids = tokenizer.encode(build_prompt(question, []))
    assert tokenizer.encode(build_prompt(question, []) + " B") == ids + [letter_ids[1]]  # the letter is one token
    expected = hf_reference.log_softmax(real.hf_model, ids)[-1][letter_ids]
    np.testing.assert_allclose(prediction["scores"], expected, atol=1e-4)
    best, second = np.sort(expected)[::-1][:2]
    if best - second < hf_reference.NEAR_TIE:
      near_ties += 1
    else:
      assert prediction["predicted"] == int(np.argmax(expected))
  expected_accuracy = np.mean([p["predicted"] == q.answer for q, p in zip(questions, record["predictions"])])
  assert record["overall"] == expected_accuracy and near_ties <= 2
  for subject, entry in record["subjects"].items():
    mine = [p for p in record["predictions"] if p["subject"] == subject]
    assert entry["correct"] == sum(p["predicted"] == p["answer"] for p in mine) and entry["questions"] == 5
  overall_line = next(line for line in result.stdout.splitlines() if line.startswith("overall"))
  assert overall_line.split()[-2:] == ["20", f"{expected_accuracy:.4f}"]
