"""GET /tokenizer_info, POST /tokenize, POST /detokenize: the server's tokenizer over HTTP, in the shapes vLLM
answers and lm-eval's `tokenizer_backend=remote` reads (eos/bos/pad tokens and the chat template; `{"tokens"}`;
`{"prompt"}`). Tokenising runs off the event loop within the same time budget as the completions' prompts."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import Field

from maxtext.serving import errors
from maxtext.serving.protocol import _Request
from maxtext.serving.served_model import ServedModel


class TokenizeRequest(_Request):
  prompt: str
  add_special_tokens: bool = False
  model: str | None = None


class DetokenizeRequest(_Request):
  tokens: list[int] = Field(max_length=1 << 20)
  model: str | None = None


def tokenizer_info(model: ServedModel) -> dict[str, Any]:
  tokenizer = model.tokenizer
  template = getattr(tokenizer, "chat_template", None)
  return {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
          "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token, "vocab_size": len(tokenizer),
          "model_max_length": model.max_context, "max_model_len": model.max_context,
          "chat_template": template if isinstance(template, str) else None}


def install(app: FastAPI, model: ServedModel) -> None:

  @app.get("/tokenizer_info")
  async def get_tokenizer_info() -> dict:
    return tokenizer_info(model)

  @app.post("/tokenize")
  async def tokenize(request: TokenizeRequest) -> dict:
    if request.model is not None:
      model.check_model(request.model)
    model.check_text(request.prompt, "prompt")
    special = request.add_special_tokens
    ids = await model.off_loop(lambda: list(model.tokenizer.encode(request.prompt, add_special_tokens=special)),
                               "tokenizing 'prompt'")
    return {"tokens": ids, "count": len(ids), "max_model_len": model.max_context}

  @app.post("/detokenize")
  async def detokenize(request: DetokenizeRequest) -> dict:
    if request.model is not None:
      model.check_model(request.model)
    known = len(model.tokenizer)
    bad = next((t for t in request.tokens if not 0 <= t < known), None)
    if bad is not None:
      raise errors.bad_request(f"token id {bad} in 'tokens' is outside the tokenizer's [0, {known})", param="tokens")
    text = await model.off_loop(lambda: model.tokenizer.decode(request.tokens), "detokenizing 'tokens'")
    return {"prompt": text}
