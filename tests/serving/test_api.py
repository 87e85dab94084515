"""The server's own logic over real HTTP (uvicorn in a thread, the `openai` client and raw requests) on a scripted
engine: prompt forms, stop strings, echo/scoring, streaming, batching and OpenAI-style errors."""

from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request

import openai
import pytest

from tests.serving.conftest import SCRIPT_TEXT
from tests.serving.fake_engine import fake_logprob


def client(base_url: str) -> openai.OpenAI:
  return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def post(base_url: str, path: str, body: dict | bytes) -> tuple[int, dict]:
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  request = urllib.request.Request(f"{base_url}{path}", data=data, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_models_lists_the_served_model(fake):
  base_url, _, _ = fake
  assert [m.id for m in client(base_url).models.list().data] == ["tiny"]


def test_completion_text_finish_and_usage(fake, tokenizer):
  base_url, engine, _ = fake
  out = client(base_url).completions.create(model="tiny", prompt="Hi there", max_tokens=3, temperature=0)
  script = engine.script
  assert out.choices[0].text == tokenizer.decode(script[:3])
  assert out.choices[0].finish_reason == "length"
  prompt_tokens = len(tokenizer.encode("Hi there"))
  assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
      prompt_tokens, 3, prompt_tokens + 3)
  assert engine.calls[-1] == ("generate", [tokenizer.encode("Hi there")])


def test_end_of_text_token_stops_and_is_not_shown(fake):
  base_url, engine, _ = fake
  out = client(base_url).completions.create(model="tiny", prompt="Hi", max_tokens=40, temperature=0)
  assert out.choices[0].text == SCRIPT_TEXT
  assert out.choices[0].finish_reason == "stop"
  assert out.usage.completion_tokens == len(engine.script)  # the end token was generated, so it counts


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text(fake, stream):
  base_url, _, _ = fake
  kwargs = dict(model="tiny", prompt="Hi", max_tokens=12, temperature=0, stop=[" fou", "nine"])
  if not stream:
    out = client(base_url).completions.create(**kwargs)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (" one two three", "stop")
    return
  chunks = list(client(base_url).completions.create(**kwargs, stream=True))
  texts = [c.choices[0].text for c in chunks]
  assert "".join(texts) == " one two three"
  assert not any("f" in t for t in texts)  # the held-back start of the stop string never leaks
  assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"


def test_prompt_forms_give_one_choice_each(fake, tokenizer):
  base_url, engine, _ = fake
  c = client(base_url)
  ids = tokenizer.encode("Hello")
  for prompt, expected in [(["Hello", "Hi"], [ids, tokenizer.encode("Hi")]), (ids, [ids]), ([ids, ids[:1]],
                                                                                             [ids, ids[:1]])]:
    out = c.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    assert [ch.index for ch in out.choices] == list(range(len(expected)))
    assert all(ch.text == tokenizer.decode(engine.script[:2]) for ch in out.choices)
    assert out.usage.prompt_tokens == sum(map(len, expected))
    assert engine.calls[-1] == ("generate", expected)


def test_echo_scores_the_prompt_without_generating(fake, tokenizer):
  base_url, engine, _ = fake
  prompt = "The answer is B"
  out = client(base_url).completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
  ids = tokenizer.encode(prompt)
  choice = out.choices[0]
  assert choice.text == prompt
  lp = choice.logprobs
  assert lp.tokens == [tokenizer.decode([t]) for t in ids]
  assert lp.token_logprobs[0] is None
  assert lp.token_logprobs[1:] == pytest.approx([fake_logprob(t) for t in ids[1:]])
  assert lp.top_logprobs[0] is None and all(len(top) == 2 for top in lp.top_logprobs[1:])
  assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
  assert out.usage.completion_tokens == 0
  assert engine.calls[-1] == ("score", [ids])


def test_echo_with_generation_continues_the_logprobs(fake, tokenizer):
  base_url, engine, _ = fake
  out = client(base_url).completions.create(model="tiny", prompt="Hi", max_tokens=2, echo=True, logprobs=1,
                                            temperature=0)
  lp = out.choices[0].logprobs
  n_prompt = len(tokenizer.encode("Hi"))
  assert out.choices[0].text == "Hi" + tokenizer.decode(engine.script[:2])
  assert len(lp.tokens) == n_prompt + 2
  assert lp.token_logprobs[n_prompt:] == pytest.approx([fake_logprob(t) for t in engine.script[:2]])
  assert lp.text_offset[n_prompt] == len("Hi")


def test_concurrent_requests_share_one_engine_call(fake_wide_window, tokenizer):
  base_url, engine, _ = fake_wide_window
  prompts = ["a", "bb", "ccc", "dddd"]
  before = len(engine.calls)
  with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
    outs = list(pool.map(lambda p: client(base_url).completions.create(model="tiny", prompt=p, max_tokens=3,
                                                                        temperature=0), prompts))
  assert all(o.choices[0].text == tokenizer.decode(engine.script[:3]) for o in outs)
  calls = engine.calls[before:]
  assert len(calls) == 1 and sorted(map(len, calls[0][1])) == sorted(len(tokenizer.encode(p)) for p in prompts)


def test_chat_stream_matches_the_full_answer(fake):
  base_url, _, _ = fake
  c = client(base_url)
  messages = [{"role": "user", "content": "Count for me."}]
  full = c.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0)
  chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, stream=True,
                                          stream_options={"include_usage": True}))
  assert all(ch.object == "chat.completion.chunk" for ch in chunks)
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == full.choices[0].message.content
  assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
  assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 5


def test_stream_ends_with_done(fake):
  base_url, _, _ = fake
  request = urllib.request.Request(
      f"{base_url}/v1/chat/completions", headers={"Content-Type": "application/json"},
      data=json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                       "stream": True}).encode())
  with urllib.request.urlopen(request, timeout=60) as response:
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.read().decode().split("\n\n") if line]
  assert all(e.startswith("data: ") for e in events)
  assert events[-1] == "data: [DONE]"


BAD_COMPLETIONS = [
    ({"prompt": "x", "n": 100_000}, "n", "invalid_value"),
    ({"prompt": ["x"] * 200, "n": 2}, "n", "invalid_value"),
    ({"prompt": "x", "temperature": -1}, "temperature", "invalid_value"),
    ({"prompt": "x", "logprobs": 50}, "logprobs", "invalid_value"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", "invalid_value"),
    ({"prompt": "x", "best_of": 3}, "best_of", "invalid_value"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty", "invalid_value"),
    ({"prompt": "x", "color": "red"}, "color", "unknown_parameter"),
    ({"prompt": ""}, "prompt", "invalid_value"),
    ({"prompt": []}, "prompt", "invalid_value"),
    ({"prompt": [10**7]}, "prompt", "invalid_value"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
]


@pytest.mark.parametrize("body,param,code", BAD_COMPLETIONS, ids=[b[1] + "-" + b[2] for b in BAD_COMPLETIONS])
def test_bad_completion_parameters_are_400(fake, body, param, code):
  status, answer = post(fake[0], "/v1/completions", {"model": "tiny", **body})
  assert status == 400, answer
  assert answer["error"]["type"] == "invalid_request_error"
  assert (answer["error"]["param"], answer["error"]["code"]) == (param, code)
  assert answer["error"]["message"]


def test_unknown_model_is_404(fake):
  status, answer = post(fake[0], "/v1/completions", {"model": "gpt-9", "prompt": "x"})
  assert status == 404
  assert answer["error"]["code"] == "model_not_found" and answer["error"]["param"] == "model"
  with pytest.raises(openai.NotFoundError):
    client(fake[0]).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])


def test_prompt_longer_than_the_context_is_400(fake):
  base_url, engine, _ = fake
  status, answer = post(base_url, "/v1/completions",
                        {"model": "tiny", "prompt": [1] * (engine.max_context - 4), "max_tokens": 5})
  assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
  status, answer = post(base_url, "/v1/chat/completions",
                        {"model": "tiny", "messages": [{"role": "user", "content": "word " * 80}]})
  assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
  assert answer["error"]["param"] == "messages"


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    ({"prompt": "x"}, 400, "model"),
])
def test_malformed_requests_are_400(fake, body, status, param):
  code, answer = post(fake[0], "/v1/completions", body)
  assert code == status and answer["error"]["param"] == param


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": "required"}, "tool_choice"),
])
def test_bad_chat_requests_are_400(fake, body, param):
  status, answer = post(fake[0], "/v1/chat/completions", {"model": "tiny", **body})
  assert status == 400 and answer["error"]["param"] == param


def test_unknown_route_is_an_openai_404(fake):
  status, answer = post(fake[0], "/v1/embeddings", {"model": "tiny", "input": "x"})
  assert status == 404 and answer["error"]["type"] == "invalid_request_error"


def test_n_choices_per_prompt_in_openai_order(fake, tokenizer):
  base_url, engine, _ = fake
  out = client(base_url).completions.create(model="tiny", prompt=["Hi", "Yo there"], n=3, max_tokens=2,
                                            temperature=0)
  assert [c.index for c in out.choices] == list(range(6))
  assert {c.text for c in out.choices} == {tokenizer.decode(engine.script[:2])}
  assert out.usage.completion_tokens == 12
  assert out.usage.prompt_tokens == 3 * (len(tokenizer.encode("Hi")) + len(tokenizer.encode("Yo there")))
  chat = client(base_url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2,
                                                  max_tokens=2, temperature=0)
  assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 4
  chunks = list(client(base_url).chat.completions.create(
      model="tiny", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=2, temperature=0, stream=True))
  for index in (0, 1):
    mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
    assert "".join(c.delta.content or "" for c in mine) == chat.choices[index].message.content
    assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]
