"""Acceptance: the server CLI started for real on a tiny converted HF checkpoint, driven by the `openai` client
(completions, chat, streaming, logprobs, stop strings, concurrent requests) and by raw HTTP for bad requests.
The expected tokens and log-probs come from the HF torch model the checkpoint was converted from."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import openai
import pytest

from tests.serving import hf_reference
from tests.serving.test_api import post

# float32 on both sides; the model-parity tests hold logits to 1e-4.
LOGPROB_ATOL = 1e-4
PROMPT = "The quick brown fox jumps over the"


def client(real) -> openai.OpenAI:
  return openai.OpenAI(base_url=f"{real.base_url}/v1", api_key="unused", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def greedy_reference(real, tokenizer):
  ids = tokenizer.encode(PROMPT)
  steps = hf_reference.greedy(real.hf_model, ids, 6)
  return ids, steps, hf_reference.comparable_prefix(steps)


@pytest.fixture(scope="module")
def greedy_completion(real):
  return client(real).completions.create(model=real.model_id, prompt=PROMPT, max_tokens=6, temperature=0,
                                         logprobs=2)


def test_models_endpoint(real):
  assert [m.id for m in client(real).models.list().data] == [real.model_id]


def test_greedy_completion_matches_hf(real, tokenizer, greedy_reference, greedy_completion):
  ids, steps, comparable = greedy_reference
  assert comparable >= 3, "the random model has near-ties too early to compare"
  choice = greedy_completion.choices[0]
  lp = choice.logprobs
  expected_tokens = [tokenizer.decode([s.token]) for s in steps[:comparable]]
  assert lp.tokens[:comparable] == expected_tokens
  np.testing.assert_allclose(lp.token_logprobs[:comparable], [s.logprob for s in steps[:comparable]],
                             atol=LOGPROB_ATOL)
  assert all(next(iter(top)) == token for top, token in zip(lp.top_logprobs[:comparable], expected_tokens))
  assert choice.text == "".join(lp.tokens) and choice.finish_reason == "length"
  assert (greedy_completion.usage.prompt_tokens, greedy_completion.usage.completion_tokens) == (len(ids), 6)


def test_echo_scores_token_prompts_like_hf(real, tokenizer):
  # Eight prompts of 17 to 64 tokens in one request, logprobs=0 (no alternatives): the engine call the MMLU
  # evaluator's requests make too, so both share one compilation.
  base = tokenizer.encode(" ".join(["The quick brown fox jumps over the lazy dog."] * 8))
  prompts = [base[: 17 + 6 * i] for i in range(7)] + [base[:64]]
  out = client(real).completions.create(model=real.model_id, prompt=prompts, max_tokens=0, echo=True, logprobs=0)
  assert [c.index for c in out.choices] == list(range(len(prompts)))
  for ids, choice in zip(prompts, out.choices):
    lp = choice.logprobs
    assert choice.text == tokenizer.decode(ids) and lp.tokens == [tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and all(t == {} for t in lp.top_logprobs[1:])
    np.testing.assert_allclose(lp.token_logprobs[1:], hf_reference.prompt_logprobs(real.hf_model, ids)[1:],
                               atol=LOGPROB_ATOL)
  assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (sum(map(len, prompts)), 0)


def test_stream_and_stop_string_agree_with_the_full_text(real, greedy_completion):
  text = greedy_completion.choices[0].text
  c = client(real)
  # logprobs as in greedy_completion: the same compiled decode step serves all three requests.
  chunks = list(c.completions.create(model=real.model_id, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                     stream=True))
  assert "".join(ch.choices[0].text for ch in chunks) == text
  assert sum((ch.choices[0].logprobs.tokens for ch in chunks), []) == greedy_completion.choices[0].logprobs.tokens
  assert chunks[-1].choices[0].finish_reason == "length"
  tokens = greedy_completion.choices[0].logprobs.tokens
  stop = tokens[2].strip() or tokens[2]
  cut = c.completions.create(model=real.model_id, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, stop=stop)
  assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_chat_uses_the_template_and_streams_the_same_answer(real, tokenizer):
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  ids = tokenizer.encode(ids)
  steps = hf_reference.greedy(real.hf_model, ids, 4)
  comparable = hf_reference.comparable_prefix(steps)
  c = client(real)
  full = c.chat.completions.create(model=real.model_id, messages=messages, max_tokens=4, temperature=0,
                                   logprobs=True, top_logprobs=2)
  assert full.usage.prompt_tokens == len(ids)
  content = full.choices[0].logprobs.content
  assert [e.token for e in content][:comparable] == [tokenizer.decode([s.token]) for s in steps[:comparable]]
  np.testing.assert_allclose([e.logprob for e in content][:comparable], [s.logprob for s in steps[:comparable]],
                             atol=LOGPROB_ATOL)
  assert all(len(e.top_logprobs) == 2 for e in content)
  chunks = list(c.chat.completions.create(model=real.model_id, messages=messages, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=2, stream=True))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full.choices[0].message.content
  assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason == "length"


def test_concurrent_requests_are_batched_and_answer_as_alone(real, greedy_completion):
  prompts = [PROMPT, "Once upon a time", "1, 2, 3, 4,"]
  c = client(real)

  def ask(prompt):
    return c.completions.create(model=real.model_id, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)

  joined = "admitted 3 prompt(s) into the running batch"  # continuous batching: all three start in one step
  alone = greedy_completion.choices[0].logprobs
  # A loaded 2-core CI machine once delivered the three requests more than the 500 ms gather window apart, so
  # they started in two steps: send them again then, at most three times. Every try's answers are checked.
  for _ in range(3):
    before = real.process.log().count(joined)
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
      together = list(pool.map(ask, prompts))
    batched = together[0].choices[0].logprobs
    # Batched with other prompts (padding, another batch shape), the same prompt gets the same answer.
    assert batched.tokens == alone.tokens
    np.testing.assert_allclose(batched.token_logprobs, alone.token_logprobs, atol=LOGPROB_ATOL)
    assert all(o.choices[0].finish_reason == "length" and o.usage.completion_tokens == 6 for o in together)
    if real.process.log().count(joined) == before + 1:
      break
  assert real.process.log().count(joined) == before + 1, "three requests sent together never started in one step"


@pytest.mark.parametrize("body,status,code", [
    ({"model": "gpt-4o", "prompt": "x"}, 404, "model_not_found"),
    ({"model": "tiny-qwen3-next", "prompt": "word " * 300}, 400, "context_length_exceeded"),
    ({"model": "tiny-qwen3-next", "prompt": "x", "max_tokens": 400}, 400, "context_length_exceeded"),
    ({"model": "tiny-qwen3-next", "prompt": "x", "n": 100_000}, 400, "invalid_value"),
    ({"model": "tiny-qwen3-next", "prompt": "x", "logprobs": 21}, 400, "invalid_value"),
    ({"model": "tiny-qwen3-next", "prompt": "x", "top_p": 0}, 400, "invalid_value"),
])
def test_bad_requests_get_openai_errors(real, body, status, code):
  answer_status, answer = post(real.base_url, "/v1/completions", body)
  assert answer_status == status, answer
  assert set(answer["error"]) == {"message", "type", "param", "code"}
  assert answer["error"]["code"] == code and answer["error"]["type"] == "invalid_request_error"


def test_clients_seeds_and_top_k_never_fail_a_batch(real):
  # seed -1 ("random"), 64-bit seeds and a huge top_k once made the engine raise, failing all six with a 500.
  extremes = [{"seed": -1}, {"seed": 2**63}, {"top_k": 10**12}, {"seed": 2**64 - 1}, {"seed": 3}, {}]
  bodies = [{"model": real.model_id, "prompt": PROMPT, "max_tokens": 2, "temperature": 0.8, **extra}
            for extra in extremes]
  with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
    answers = list(pool.map(lambda body: post(real.base_url, "/v1/completions", body), bodies))
  assert [status for status, _ in answers] == [200] * len(bodies), answers
  assert all(answer["usage"]["completion_tokens"] == 2 for _, answer in answers)


def test_n_samples_are_distinct_streams_and_reproducible(real):
  body = {"model": real.model_id, "prompt": PROMPT, "max_tokens": 2, "temperature": 1.0, "n": 3, "seed": 5}
  first, again = (post(real.base_url, "/v1/completions", body) for _ in range(2))
  assert first[0] == again[0] == 200, first
  texts = [c["text"] for c in first[1]["choices"]]
  assert texts == [c["text"] for c in again[1]["choices"]]  # seeded: the same three samples again
  assert len(set(texts)) > 1  # each choice its own stream (seed + index), not three copies
