"""Qwen3 chat output -> reasoning_content, tool_calls and content, whole and streamed in pieces of any size."""

from __future__ import annotations

import json

import pytest

from maxtext.serving.chat_output import ChatOutput, parse

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}\n</tool_call>'
CASES = [
    # (text, thinking, tools, started_thinking, expected message)
    ("<think>\nLet me think.\n</think>\n\nThe answer is 4.", True, False, False,
     {"content": "The answer is 4.", "reasoning_content": "Let me think."}),
    ("Let me think.\n</think>\n\nThe answer is 4.", True, False, True,
     {"content": "The answer is 4.", "reasoning_content": "Let me think."}),
    ("Plain answer with <think> in it.", True, False, False, {"content": "Plain answer with <think> in it."}),
    ("<think>\nx\n</think>\n\n" + CALL, True, True, False,
     {"content": None, "reasoning_content": "x",
      "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}]}),
    ("Sure.\n" + CALL + "\n" + CALL.replace("Paris", "Oslo"), True, True, False,
     {"content": "Sure.\n\n", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}},
                                           {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "°C"}}]}),
    ("<tool_call>\nnot json\n</tool_call>", True, True, False, {"content": "<tool_call>\nnot json\n</tool_call>"}),
    ("<tool_call>\n{\"name\": \"f\"", True, True, False, {"content": "<tool_call>\n{\"name\": \"f\""}),  # cut short
    (CALL, True, False, False, {"content": CALL}),  # no tools offered: left as text
]


def normalised(message: dict) -> dict:
  out = dict(message)
  if "tool_calls" in out:
    for call in out["tool_calls"]:
      assert call["type"] == "function" and call["id"].startswith("call_")
    out["tool_calls"] = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                         for c in out["tool_calls"]]
  return out


@pytest.mark.parametrize("text,thinking,tools,started,expected", CASES)
def test_whole_answer(text, thinking, tools, started, expected):
  assert normalised(parse(text, thinking, tools, started)) == expected


@pytest.mark.parametrize("piece", [1, 2, 3, 7])
@pytest.mark.parametrize("text,thinking,tools,started,expected", CASES)
def test_streamed_in_pieces_gives_the_same_parts(text, thinking, tools, started, expected, piece):
  parser = ChatOutput(thinking, tools, started)
  parts = []
  for start in range(0, len(text), piece):
    new = parser.feed(text[start : start + piece])
    # Never a partial tag on show (where the tags are tags, not text of the answer).
    if "<" not in (expected["content"] or ""):
      assert not any(k != "tool_call" and v.endswith(("<", "</", "<th", "<tool")) for k, v in new)
    parts += new
  parts += parser.finish()
  content = "".join(v for k, v in parts if k == "content")
  reasoning = "".join(v for k, v in parts if k == "reasoning")
  calls = [v for k, v in parts if k == "tool_call"]
  assert (content or None) == expected["content"] or content == (expected["content"] or "")
  assert reasoning.rstrip("\n") == expected.get("reasoning_content", "")
  assert normalised({"tool_calls": calls})["tool_calls"] == expected.get("tool_calls", [])


CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": CITY}}]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_answers_tool_calls_and_reasoning_over_http(tokenizer, stream):
  import openai

  from tests.serving.live_server import fake_server

  answer = "<think>\nThe user wants weather.\n</think>\n\n" + CALL
  script = tokenizer.encode(answer) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
  with fake_server(tokenizer, script, window_s=0.0, max_context=512) as (base_url, engine, _):
    api = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "-3"},
                {"role": "user", "content": "And Paris?"}]
    kwargs = dict(model="tiny", messages=messages, tools=TOOLS, max_tokens=200, temperature=0)
    if stream:
      chunks = list(api.chat.completions.create(stream=True, **kwargs))
      deltas = [c.choices[0].delta for c in chunks if c.choices]
      reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
      content = "".join(d.content or "" for d in deltas)
      calls = [call for d in deltas for call in (d.tool_calls or [])]
      finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
      assert [call.index for call in calls] == [0]
    else:
      out = api.chat.completions.create(**kwargs)
      message = out.choices[0].message
      reasoning, content, calls = getattr(message, "reasoning_content", None), message.content, message.tool_calls
      finish = [out.choices[0].finish_reason]
    assert reasoning.strip() == "The user wants weather."
    assert not content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "°C"})]
    assert finish == ["tool_calls"]
    # The tools reached the template (its system block) and the earlier call went in as an object, not a string.
    prompt = tokenizer.decode(engine.calls[-1][1][0])
    assert "get_weather" in prompt.split("<|im_start|>user")[0]
    assert '"arguments": {"city": "Oslo"}' in prompt
