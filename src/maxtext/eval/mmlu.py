"""MMLU accuracy of a model behind an OpenAI-compatible server, 0- or k-shot, per subject and overall.

  python3 -m maxtext.eval.mmlu --server http://127.0.0.1:8000 --data DIR_OR_FILE [--shots 5] [--subjects a,b]

Each question's four answers " A".." D" are scored by their log-probability after the prompt (one completions
request per question, echo + max_tokens=0); the most likely one is the prediction. k-shot examples are the first k
questions of the subject in the dev split (`--dev-data`, default: the same path as --data).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

from maxtext.eval.completions_client import CompletionsScorer, ServerError
from maxtext.eval.mmlu_data import DataError, Question, load_split
from maxtext.eval.mmlu_prompt import CONTINUATIONS, build_prompt

# (prompt, continuations) -> log-likelihood of each continuation
Scorer = Callable[[str, Sequence[str]], Sequence[float]]


@dataclasses.dataclass(frozen=True)
class Outcome:
  question: Question
  scores: tuple[float, ...]

  @property
  def predicted(self) -> int:
    return max(range(len(self.scores)), key=lambda i: self.scores[i])  # the first of equal scores

  @property
  def correct(self) -> bool:
    return self.predicted == self.question.answer


@dataclasses.dataclass(frozen=True)
class Accuracy:
  per_subject: dict[str, tuple[int, int]]  # subject -> (correct, questions)

  @property
  def overall(self) -> float:
    """Micro average: correct answers over all questions."""
    correct = sum(c for c, _ in self.per_subject.values())
    return correct / max(1, sum(n for _, n in self.per_subject.values()))

  @property
  def subject_average(self) -> float:
    """Macro average: the mean of the subjects' accuracies."""
    return sum(c / n for c, n in self.per_subject.values()) / max(1, len(self.per_subject))


def few_shot_examples(dev: Sequence[Question], subjects: set[str], shots: int) -> dict[str, list[Question]]:
  by_subject: dict[str, list[Question]] = collections.defaultdict(list)
  for question in dev:
    by_subject[question.subject].append(question)
  for subject in sorted(subjects):
    if len(by_subject[subject]) < shots:
      raise DataError(f"subject '{subject}' has {len(by_subject[subject])} dev questions, fewer than --shots {shots}")
  return {subject: by_subject[subject][:shots] for subject in subjects}


def evaluate(questions: Sequence[Question], examples: dict[str, list[Question]], scorer: Scorer,
             concurrency: int = 8, progress: Callable[[int, int], None] | None = None) -> list[Outcome]:
  """Score every question (several at once, so the server can batch them); outcomes in question order."""

  def score(question: Question) -> Outcome:
    prompt = build_prompt(question, examples.get(question.subject, []))
    scores = tuple(float(s) for s in scorer(prompt, CONTINUATIONS))
    if len(scores) != len(CONTINUATIONS):
      raise ServerError(f"expected {len(CONTINUATIONS)} scores, got {len(scores)}")
    return Outcome(question, scores)

  outcomes: list[Outcome | None] = [None] * len(questions)
  with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool:
    futures = {pool.submit(score, q): i for i, q in enumerate(questions)}
    try:
      for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
        outcomes[futures[future]] = future.result()
        if progress is not None:
          progress(done, len(questions))
    except BaseException:
      for future in futures:
        future.cancel()  # stop at the first failure rather than sending the rest
      raise
  return outcomes


def accuracy(outcomes: Sequence[Outcome]) -> Accuracy:
  counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
  for outcome in outcomes:
    counts[outcome.question.subject][0] += outcome.correct
    counts[outcome.question.subject][1] += 1
  return Accuracy({subject: (c, n) for subject, (c, n) in sorted(counts.items())})


def report(result: Accuracy) -> str:
  width = max([len(s) for s in result.per_subject] + [len("subject average (macro)")])
  lines = [f"{'subject':<{width}}  questions  accuracy"]
  for subject, (correct, total) in result.per_subject.items():
    lines.append(f"{subject:<{width}}  {total:>9}  {correct / total:8.4f}")
  total = sum(n for _, n in result.per_subject.values())
  lines.append(f"{'overall':<{width}}  {total:>9}  {result.overall:8.4f}")
  lines.append(f"{'subject average (macro)':<{width}}  {len(result.per_subject):>9}  {result.subject_average:8.4f}")
  return "\n".join(lines)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python3 -m maxtext.eval.mmlu", description=__doc__.split("\n")[0])
  parser.add_argument("--server", default="http://127.0.0.1:8000", help="server URL (with or without /v1)")
  parser.add_argument("--model", default=None, help="model id to request (default: the server's first model)")
  parser.add_argument("--data", required=True, help="file or directory of MMLU parquet/csv/jsonl files")
  parser.add_argument("--dev-data", default=None, help="where the few-shot examples are (default: --data)")
  parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
  parser.add_argument("--dev-split", default="dev", help="split the few-shot examples come from (default: dev)")
  parser.add_argument("--shots", type=int, default=0, help="solved examples before each question (MMLU: 0 or 5)")
  parser.add_argument("--subjects", default="", help="comma-separated subjects (default: all in the data)")
  parser.add_argument("--limit", type=int, default=0, help="at most this many questions per subject (0: all)")
  parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (the server batches them)")
  parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one request")
  parser.add_argument("--output", default=None, help="write the accuracies and every prediction to this JSON file")
  args = parser.parse_args(argv)
  if args.shots < 0:
    parser.error("--shots must be >= 0")
  if args.limit < 0:
    parser.error("--limit must be >= 0")
  return args


def _select(questions: list[Question], subjects: str, limit: int) -> list[Question]:
  if subjects:
    wanted = [s.strip() for s in subjects.split(",") if s.strip()]
    present = {q.subject for q in questions}
    missing = [s for s in wanted if s not in present]
    if missing:
      raise DataError(f"subject '{missing[0]}' is not in the data (it has: {', '.join(sorted(present))})")
    questions = [q for q in questions if q.subject in wanted]
  if limit:
    taken: dict[str, int] = collections.Counter()
    kept = []
    for q in questions:
      if taken[q.subject] < limit:
        taken[q.subject] += 1
        kept.append(q)
    questions = kept
  return questions


def _write_output(path: str, result: Accuracy, outcomes: Sequence[Outcome], args: argparse.Namespace) -> None:
  record = {
      "shots": args.shots, "data": args.data, "split": args.split, "model": args.model,
      "overall": result.overall, "subject_average": result.subject_average,
      "subjects": {s: {"correct": c, "questions": n, "accuracy": c / n} for s, (c, n) in result.per_subject.items()},
      "predictions": [{"subject": o.question.subject, "question": o.question.question, "answer": o.question.answer,
                       "predicted": o.predicted, "scores": list(o.scores)} for o in outcomes],
  }
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, path)  # never a half-written results file


def _check_writable(path: str) -> None:
  """Fail before any question runs, not after all of them: the results would be lost."""
  probe = f"{path}.tmp"
  try:
    with open(probe, "w", encoding="utf-8"):
      pass
    os.remove(probe)
  except OSError as e:
    raise DataError(f"--output '{path}' is not writable: {e.strerror or e}") from None
  if os.path.isdir(path):
    raise DataError(f"--output '{path}' is a directory")


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  try:
    if args.output:
      _check_writable(args.output)
    questions = _select(load_split(args.data, args.split), args.subjects, args.limit)
    if not questions:
      raise DataError(f"no questions in '{args.data}' ({args.split} split)")
    subjects = {q.subject for q in questions}
    dev = load_split(args.dev_data or args.data, args.dev_split) if args.shots else []
    examples = few_shot_examples(dev, subjects, args.shots)
    scorer = CompletionsScorer(args.server, args.model, timeout=args.timeout)
    args.model = scorer.model
    print(f"MMLU {args.shots}-shot: {len(questions)} questions in {len(subjects)} subjects, model '{scorer.model}'"
          f" at {scorer.root}", file=sys.stderr)
    start = time.perf_counter()
    step = max(1, len(questions) // 10)

    def progress(done: int, total: int) -> None:
      if done % step == 0 or done == total:
        print(f"  scored {done}/{total} questions ({time.perf_counter() - start:.1f}s)", file=sys.stderr)

    outcomes = evaluate(questions, examples, scorer, args.concurrency, progress)
  except (DataError, ServerError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2 if isinstance(e, DataError) else 1
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  result = accuracy(outcomes)
  print(report(result))
  if args.output:
    _write_output(args.output, result, outcomes, args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
