"""MMLU prompts as in the original paper and lm-evaluation-harness: a subject header, k solved examples from the
dev split, then the question; the model's answer is scored as the continuation " A", " B", " C" or " D"."""

from __future__ import annotations

from collections.abc import Sequence

from maxtext.eval.mmlu_data import LETTERS, Question

CONTINUATIONS = tuple(f" {letter}" for letter in LETTERS)


def subject_header(subject: str) -> str:
  return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def format_question(question: Question, with_answer: bool) -> str:
  lines = [question.question.strip(), *(f"{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices))]
  text = "\n".join(lines) + "\nAnswer:"
  return text + f" {LETTERS[question.answer]}\n\n" if with_answer else text


def build_prompt(question: Question, examples: Sequence[Question]) -> str:
  """The prompt whose continuation is the answer letter; `examples` are the few-shot questions (with answers)."""
  shots = "".join(format_question(example, with_answer=True) for example in examples)
  return subject_header(question.subject) + shots + format_question(question, with_answer=False)
