"""The grain pipeline over the shipped corpus: packing layout, SFT loss masks, file formats, resumable state, and
one-line errors for bad input."""

import json
import os

import numpy as np
import pytest

from maxtext.assets.data.build_tiny_tokenizer import DATA_DIR, TINY_TOKENIZER_DIR
from maxtext.configs import ConfigError, load_config
from maxtext.input_pipeline import make_train_iterator
from maxtext.input_pipeline.tokenization import load_tokenizer

CORPUS = os.path.join(DATA_DIR, "corpus.jsonl")
CHAT = os.path.join(DATA_DIR, "chat.jsonl")


def data_config(**overrides):
  values = {
      "dataset_type": "grain", "grain_train_files": CORPUS, "tokenizer_path": TINY_TOKENIZER_DIR,
      "max_target_length": 64, "max_prefill_predict_length": 16, **overrides,
  }
  return load_config(overrides=values)


def corpus_documents(tokenizer):
  eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
  with open(CORPUS, encoding="utf-8") as f:
    return [tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [eos] for line in f]


def segments(row):
  """(segment id, start, end) of each packed document in a row."""
  ids = row["segment_ids"]
  out = []
  for segment in sorted(set(ids.tolist()) - {0}):
    where = np.flatnonzero(ids == segment)
    assert np.array_equal(where, np.arange(where[0], where[-1] + 1)), "a segment must be contiguous"
    out.append((segment, where[0], where[-1] + 1))
  return out


def test_packed_rows_hold_whole_pieces_of_corpus_documents_with_shifted_targets():
  config = data_config(enable_data_shuffling=False)
  tokenizer = load_tokenizer(config)
  documents = corpus_documents(tokenizer)
  batch = next(make_train_iterator(config, global_batch_size=4))
  assert {k: v.shape for k, v in batch.items()} == {k: (4, 64) for k in batch}
  flat = np.concatenate([row for row in batch["inputs"]])
  stream = np.concatenate(documents)
  # Without shuffling, concatenate-then-split keeps the corpus order: the rows are the token stream minus the last
  # token of each document (it is only a target).
  inputs_stream = np.concatenate([d[:-1] for d in documents])
  assert np.array_equal(flat, inputs_stream[: flat.size])
  for r in range(4):
    row = {k: v[r] for k, v in batch.items()}
    for _, start, end in segments(row):
      assert np.array_equal(row["positions"][start:end], np.arange(end - start))
      # each target is the next token of the same document
      piece = row["inputs"][start:end]
      match = [i for i in range(stream.size - (end - start)) if np.array_equal(stream[i : i + end - start], piece)]
      assert match and np.array_equal(row["targets"][start:end], stream[match[0] + 1 : match[0] + 1 + end - start])
  assert batch["loss_mask"].min() == 1.0 and batch["segment_ids"].min() >= 1  # no padding when packing text


def test_unpacked_rows_are_one_document_each_padded_without_loss():
  config = data_config(enable_data_shuffling=False, packing=False)
  documents = corpus_documents(load_tokenizer(config))
  batch = next(make_train_iterator(config, global_batch_size=2))
  for r in range(2):
    n = min(len(documents[r]) - 1, 64)  # longer documents are cut
    assert np.array_equal(batch["inputs"][r, :n], documents[r][:n])
    assert np.array_equal(batch["targets"][r, :n], documents[r][1 : n + 1])
    assert batch["segment_ids"][r, :n].min() == 1 and batch["segment_ids"][r, n:].max(initial=0) == 0
    assert batch["loss_mask"][r, :n].min() == 1 and batch["loss_mask"][r, n:].max(initial=0) == 0
  assert (batch["segment_ids"] == 0).any(), "expected a padded row (the corpus has documents under 64 tokens)"


def test_sft_trains_only_on_assistant_replies_and_their_end_of_turn():
  config = data_config(grain_train_files=CHAT, train_data_columns="messages", use_sft=True, enable_data_shuffling=False)
  tokenizer = load_tokenizer(config)
  batch = next(make_train_iterator(config, global_batch_size=2))
  with open(CHAT, encoding="utf-8") as f:
    replies = [json.loads(line)["messages"][-1]["content"] for line in f]
  trained_rows = []
  for r in range(2):
    row = {k: v[r] for k, v in batch.items()}
    for _, start, end in segments(row):
      weights = row["loss_mask"][start:end]
      trained = tokenizer.decode(row["targets"][start:end][weights > 0])
      everything = tokenizer.decode(row["targets"][start:end])
      assert "user" in everything and "system" in everything
      trained_rows.append(trained)
  assert trained_rows, "no conversation packed"
  for trained in trained_rows:
    assert trained.endswith("<|im_end|>") and trained[: -len("<|im_end|>")] in replies


def test_parquet_and_arrayrecord_give_the_jsonl_batches(tmp_path):
  pyarrow = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  from array_record.python.array_record_module import ArrayRecordWriter

  with open(CORPUS, encoding="utf-8") as f:
    texts = [json.loads(line)["text"] for line in f]
  pq.write_table(pyarrow.table({"text": texts}), str(tmp_path / "corpus.parquet"), row_group_size=16)
  writer = ArrayRecordWriter(str(tmp_path / "corpus.array_record"), "group_size:1")
  for text in texts:
    writer.write(text.encode("utf-8"))
  writer.close()
  expected = next(make_train_iterator(data_config(), 4))
  for name, file_type in (("corpus.parquet", "parquet"), ("corpus.array_record", "arrayrecord")):
    got = next(make_train_iterator(data_config(grain_train_files=str(tmp_path / name), grain_file_type=file_type), 4))
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{file_type} {key}")


def test_hf_layout_reads_the_same_files(tmp_path):
  (tmp_path / "en").mkdir()
  with open(CORPUS, encoding="utf-8") as f, open(tmp_path / "en" / "train-00000.jsonl", "w", encoding="utf-8") as g:
    g.write(f.read())
  hf = next(make_train_iterator(data_config(dataset_type="hf", hf_path=str(tmp_path), hf_data_dir="en"), 4))
  grain = next(make_train_iterator(data_config(), 4))
  for key in grain:
    np.testing.assert_array_equal(hf[key], grain[key])


def test_restored_iterator_state_continues_with_the_same_batches():
  config = data_config(data_shuffle_seed=3)
  iterator = make_train_iterator(config, 4)
  for _ in range(7):  # past the end of the first epoch (the corpus is ~20 rows of 64)
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]
  resumed = make_train_iterator(config, 4)
  resumed.set_state(json.loads(json.dumps(state)))  # as stored in a checkpoint
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_shuffling_depends_on_the_seed():
  first = lambda seed: next(make_train_iterator(data_config(data_shuffle_seed=seed), 4))["inputs"]
  assert np.array_equal(first(1), first(1))
  assert not np.array_equal(first(1), first(2))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"grain_train_files": "/nonexistent/*.jsonl"}, "config key 'grain_train_files': no file matches '/nonexistent/"),
        ({"tokenizer_path": "/nonexistent/tok"}, "config key 'tokenizer_path': '/nonexistent/tok' does not exist"),
        ({"dataset_type": "hf", "hf_path": "/nonexistent/ds"}, "config key 'hf_path': '/nonexistent/ds' is not a"),
        ({"tokenizer_path": ""}, "outside the model's vocabulary (vocab_size=512)"),  # the Qwen tokenizer
        ({"train_data_columns": "body"}, "a record has no column 'body'"),
    ],
)
def test_bad_input_is_one_line_naming_the_culprit(overrides, message):
  with pytest.raises(ConfigError) as error:
    next(make_train_iterator(data_config(**overrides), 4))
  assert message in str(error.value) and "\n" not in str(error.value)


def test_a_corrupt_jsonl_line_is_named(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"text": broken\n')
  with pytest.raises(OSError, match=r"bad.jsonl' line 2 is not valid JSON"):
    iterator = make_train_iterator(data_config(grain_train_files=str(bad), enable_data_shuffling=False), 1)
    for _ in range(3):
      next(iterator)
