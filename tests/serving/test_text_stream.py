"""Incremental detokenisation: whole characters only, stop strings cut and never shown in part."""

from __future__ import annotations

import pytest

from maxtext.serving.text_stream import TextStream


def stream_all(tokenizer, text: str, stop=()) -> tuple[list[str], TextStream]:
  stream = TextStream(tokenizer, stop)
  pieces = [stream.add(t) for t in tokenizer.encode(text)]
  pieces.append(stream.finish())
  return pieces, stream


def test_split_characters_are_held_until_complete(tokenizer):
  text = "naïve 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 日本語 ok"
  ids = tokenizer.encode(text)
  assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # the case under test: tokens that split characters
  pieces, stream = stream_all(tokenizer, text)
  assert not any("\ufffd" in p for p in pieces)
  assert "".join(pieces) == stream.text == text


@pytest.mark.parametrize("stop,expected", [
    ([" brown"], "The quick"),
    (["ck br", "zzz"], "The qui"),
    (["fox", "quick"], "The "),
    (["absent"], "The quick brown fox jumps"),
])
def test_text_is_cut_at_the_first_stop_string(tokenizer, stop, expected):
  pieces, stream = stream_all(tokenizer, "The quick brown fox jumps", stop)
  assert "".join(pieces) == stream.text == expected
  assert stream.stopped == (expected != "The quick brown fox jumps")


def test_possible_stop_prefix_is_held_back_then_released(tokenizer):
  stream = TextStream(tokenizer, ["Hello world!"])
  shown = [stream.add(t) for t in tokenizer.encode("Hello world")]
  assert "".join(shown) == ""  # all of it could still become the stop string
  assert stream.finish() == "Hello world" and not stream.stopped
