"""The ASGI app: OpenAI routes over a ServedModel."""

from __future__ import annotations

import contextlib

from fastapi import FastAPI

from maxtext.serving import chat, completions, errors
from maxtext.serving.protocol import ChatCompletionRequest, CompletionRequest, model_card
from maxtext.serving.served_model import ServedModel


def build_app(model: ServedModel) -> FastAPI:

  @contextlib.asynccontextmanager
  async def lifespan(_: FastAPI):
    yield
    model.batcher.close()

  app = FastAPI(title="maxtext OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None)
  errors.install(app)

  @app.get("/health")
  async def health() -> dict:
    return {"status": "ok"}

  @app.get("/v1/models")
  async def list_models() -> dict:
    return {"object": "list", "data": [model_card(model.model_id, model.created, model.max_context)]}

  @app.get("/v1/models/{model_id:path}")
  async def get_model(model_id: str) -> dict:
    model.check_model(model_id)
    return model_card(model.model_id, model.created, model.max_context)

  @app.post("/v1/completions")
  async def create_completion(request: CompletionRequest):
    return await completions.create(request, model)

  @app.post("/v1/chat/completions")
  async def create_chat_completion(request: ChatCompletionRequest):
    return await chat.create(request, model)

  return app
