"""MMLU prompts and accuracy: exact prompt text, and accuracy from a scorer whose answers we choose."""

from __future__ import annotations

import os

import pytest

from maxtext.eval import mmlu
from maxtext.eval.completions_client import continuation_logprob
from maxtext.eval.mmlu_data import DataError, Question, load_split
from maxtext.eval.mmlu_prompt import build_prompt

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "src", "maxtext", "assets", "mmlu_sample")


def test_prompt_matches_the_mmlu_format():
  shot = Question("high_school_geography", "Largest ocean?", ("Atlantic", "Pacific", "Indian", "Arctic"), 1)
  question = Question("high_school_geography", " Which is a continent? ", ("Asia", "Nile", "Alps", "Gobi"), 0)
  assert build_prompt(question, [shot]) == (
      "The following are multiple choice questions (with answers) about high school geography.\n\n"
      "Largest ocean?\nA. Atlantic\nB. Pacific\nC. Indian\nD. Arctic\nAnswer: B\n\n"
      "Which is a continent?\nA. Asia\nB. Nile\nC. Alps\nD. Gobi\nAnswer:")


class ChosenScorer:
  """Knows the answers: right on the questions in `right`, else prefers the next letter; records the prompts."""

  def __init__(self, questions, right):
    self.by_text = {q.question.strip(): q for q in questions}
    self.right = right
    self.prompts = []

  def __call__(self, prompt, continuations):
    self.prompts.append(prompt)
    question = self.by_text[prompt.rsplit("\n", 6)[-6]]
    assert list(continuations) == [" A", " B", " C", " D"]
    chosen = question.answer if question.question in self.right else (question.answer + 1) % 4
    return [-1.0 if i == chosen else -3.0 - i for i in range(4)]


def test_accuracy_per_subject_and_overall():
  questions = load_split(SAMPLE, "test")
  dev = load_split(SAMPLE, "dev")
  # Right on 3 astronomy questions, 1 in mathematics, none elsewhere: 4/20 overall, macro (3/5+1/5)/4.
  astronomy = [q.question for q in questions if q.subject == "astronomy"][:3]
  maths = [q.question for q in questions if q.subject == "elementary_mathematics"][:1]
  scorer = ChosenScorer(questions, set(astronomy + maths))
  examples = mmlu.few_shot_examples(dev, {q.subject for q in questions}, shots=5)
  outcomes = mmlu.evaluate(questions, examples, scorer, concurrency=4)
  result = mmlu.accuracy(outcomes)
  assert result.per_subject == {"astronomy": (3, 5), "computer_security": (0, 5), "elementary_mathematics": (1, 5),
                                "high_school_geography": (0, 5)}
  assert result.overall == pytest.approx(4 / 20)
  assert result.subject_average == pytest.approx((3 / 5 + 1 / 5) / 4)
  assert [o.question for o in outcomes] == questions
  # 5-shot: each prompt carries its own subject's first five dev questions with their answers.
  for prompt in scorer.prompts:
    subject = next(q.subject for q in questions if q.question.strip() in prompt)
    assert all(d.question in prompt for d in dev if d.subject == subject)
    assert prompt.count("Answer: ") == 5 and prompt.endswith("Answer:")
  assert "subject average (macro)" in mmlu.report(result)


def test_too_few_dev_questions_for_the_shots():
  dev = load_split(SAMPLE, "dev")
  with pytest.raises(DataError, match="fewer than --shots 6"):
    mmlu.few_shot_examples(dev, {"astronomy"}, shots=6)


def test_continuation_logprob_sums_the_tokens_after_the_context():
  logprobs = {"tokens": ["Answer", ":", " B"], "text_offset": [0, 6, 7], "token_logprobs": [None, -0.5, -2.0]}
  assert continuation_logprob(logprobs, len("Answer:")) == -2.0
  two = {"tokens": ["x", ":", " Par", "is"], "text_offset": [0, 1, 2, 6], "token_logprobs": [None, -1, -2, -3]}
  assert continuation_logprob(two, 2) == -5


def test_scores_split_utf8_characters_as_lm_eval(fake, tokenizer):
  """A context ending in characters the tokenizer splits into byte tokens: the continuation's score is the sum
  over lm-eval's continuation tokens (whole[len(tokens(context)):]), no context token counted (the text-offset
  method counted some: each byte token decodes to one U+FFFD character)."""
  from maxtext.eval.completions_client import CompletionsScorer
  from tests.serving.fake_engine import fake_logprob

  scorer = CompletionsScorer(fake[0])
  assert scorer.tokenizes
  context = "Which is larger, 鱻 or 𝔘?\nAnswer: 鱻𝔘"
  for continuation in (" A", "鱻 B", " "):
    whole = tokenizer.encode(context + continuation)
    expected = sum(fake_logprob(t) for t in whole[len(tokenizer.encode(context)):])
    assert scorer(context, [continuation]) == pytest.approx([expected])
  # The text-offset fallback on the same answer overcounts here: the bug this replaced.
  scorer.tokenizes = False
  assert scorer(context, [" A"])[0] < fake_logprob(tokenizer.encode(" A")[0]) - 0.1
