"""Reading MMLU-format data: the shipped sample, HF's parquet layout, csv and jsonl, and bad files."""

from __future__ import annotations

import csv
import json
import os

import pytest

from maxtext.eval.mmlu_data import DataError, Question, load_split

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "src", "maxtext", "assets", "mmlu_sample")
SUBJECTS = {"astronomy", "computer_security", "elementary_mathematics", "high_school_geography"}


def test_shipped_sample_has_dev_and_test_for_each_subject():
  for split in ("dev", "test"):
    questions = load_split(SAMPLE, split)
    assert len(questions) == 20 and {q.subject for q in questions} == SUBJECTS
    assert all(len(q.choices) == 4 and 0 <= q.answer < 4 for q in questions)
    assert len({q.answer for q in questions}) == 4  # answers are not all one letter
  assert not set(load_split(SAMPLE, "dev")) & set(load_split(SAMPLE, "test"))


def write_hf_parquet_layout(root, questions: list[Question]) -> None:
  """cais/mmlu: <subject>/test-00000-of-00001.parquet and the same rows again in all/."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  def table(rows):
    return pa.table({"question": [q.question for q in rows], "subject": [q.subject for q in rows],
                     "choices": [list(q.choices) for q in rows], "answer": pa.array([q.answer for q in rows],
                                                                                     pa.int64())})

  for subject in sorted({q.subject for q in questions}):
    os.makedirs(root / subject)
    pq.write_table(table([q for q in questions if q.subject == subject]),
                   root / subject / "test-00000-of-00001.parquet")
  os.makedirs(root / "all")
  pq.write_table(table(questions), root / "all" / "test-00000-of-00001.parquet")


def test_parquet_layout_reads_the_same_questions_once(tmp_path):
  questions = load_split(SAMPLE, "test")
  write_hf_parquet_layout(tmp_path, questions)
  assert sorted(load_split(str(tmp_path), "test"), key=repr) == sorted(questions, key=repr)


def test_csv_with_header_and_original_mmlu_csv(tmp_path):
  questions = [q for q in load_split(SAMPLE, "test") if q.subject == "astronomy"]
  with open(tmp_path / "test.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["question", "subject", "choices", "answer"])
    for q in questions:
      writer.writerow([q.question, q.subject, json.dumps(list(q.choices)), q.answer])
  assert load_split(str(tmp_path / "test.csv"), "test") == questions
  original = tmp_path / "data" / "test"
  os.makedirs(original)
  with open(original / "astronomy_test.csv", "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows([[q.question, *q.choices, "ABCD"[q.answer]] for q in questions])
  assert load_split(str(tmp_path / "data"), "test") == questions


@pytest.mark.parametrize("content,message", [
    ('{"question": "q", "subject": "s", "choices": ["a", "b", "c"], "answer": 0}\n', "4 options"),
    ('{"question": "q", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": 7}\n', "'answer' must be"),
    ('{"question": "q", "choices": ["a", "b", "c", "d"]\n', "line 1 is not valid JSON"),
    ('{"subject": "s", "choices": ["a", "b", "c", "d"], "answer": 1}\n', "no 'question' column"),
])
def test_bad_rows_name_the_file(tmp_path, content, message):
  path = tmp_path / "test.jsonl"
  path.write_text(content, encoding="utf-8")
  with pytest.raises(DataError, match=message) as error:
    load_split(str(path), "test")
  assert str(path) in str(error.value)


def test_missing_split_is_one_line(tmp_path):
  with pytest.raises(DataError, match="no 'validation' files"):
    load_split(SAMPLE, "validation")
