"""The evaluator's command line over real HTTP, against the server on a scripted engine whose prompt log-probs
are a known function of the token id (so the expected predictions are computable here)."""

from __future__ import annotations

import json
import os

import pytest

from maxtext.eval import mmlu
from maxtext.eval.mmlu_data import load_split
from tests.serving.fake_engine import fake_logprob

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "src", "maxtext", "assets", "mmlu_sample")


@pytest.mark.parametrize("shots", [0, 5])
def test_cli_scores_every_question_through_the_server(fake, tokenizer, tmp_path, capsys, shots):
  base_url, engine, _ = fake
  output = tmp_path / "results.json"
  code = mmlu.main(["--server", base_url, "--data", SAMPLE, "--shots", str(shots), "--output", str(output),
                    "--subjects", "astronomy,computer_security"])
  assert code == 0
  # The scripted engine gives token t the log-prob fake_logprob(t): the prediction is the same letter everywhere.
  letter_scores = [fake_logprob(tokenizer.encode(f" {letter}")[0]) for letter in "ABCD"]
  predicted = max(range(4), key=lambda i: letter_scores[i])
  questions = [q for q in load_split(SAMPLE, "test") if q.subject in ("astronomy", "computer_security")]
  record = json.loads(output.read_text())
  assert [p["predicted"] for p in record["predictions"]] == [predicted] * len(questions)
  assert [p["scores"] for p in record["predictions"]] == [pytest.approx(letter_scores)] * len(questions)
  expected = sum(q.answer == predicted for q in questions) / len(questions)
  assert record["overall"] == pytest.approx(expected)
  table = capsys.readouterr().out
  assert "overall" in table and f"{expected:.4f}" in table
  # One scoring call per question, four prompts each (batched by the server as they arrive together).
  scored = [prompts for kind, prompts in engine.calls if kind == "score"]
  assert sum(map(len, scored)) >= 4 * len(questions)


def test_cli_reports_an_unreachable_server(capsys):
  code = mmlu.main(["--server", "http://127.0.0.1:9", "--data", SAMPLE])
  assert code == 1
  assert capsys.readouterr().err.strip().startswith("error: cannot reach the server")


def test_cli_reports_a_prompt_too_long_for_the_server(fake, capsys):
  # Shrink the served context below the prompts' length: the server answers 400, the evaluator says so.
  _, _, model = fake
  saved = model.max_context
  model.max_context = 40
  try:
    code = mmlu.main(["--server", fake[0], "--data", SAMPLE, "--subjects", "astronomy"])
  finally:
    model.max_context = saved
  assert code == 1
  assert "context" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["missing_dir", "directory"])
def test_cli_refuses_an_unwritable_output_before_scoring(fake, tmp_path, capsys, where):
  _, engine, _ = fake
  output = tmp_path / "nowhere" / "results.json" if where == "missing_dir" else tmp_path
  calls = len(engine.calls)
  code = mmlu.main(["--server", fake[0], "--data", SAMPLE, "--subjects", "astronomy", "--output", str(output)])
  assert code == 2
  assert "--output" in capsys.readouterr().err
  assert len(engine.calls) == calls  # nothing was scored
