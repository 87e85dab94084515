"""The ASGI app: OpenAI routes, the tokenizer routes and /metrics over a ServedModel, behind the guards."""

from __future__ import annotations

import contextlib

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from maxtext.serving import chat, completions, errors, metrics, tokenizer_routes
from maxtext.serving.guards import Guards
from maxtext.serving.protocol import ChatCompletionRequest, CompletionRequest, model_card
from maxtext.serving.served_model import ServedModel


def build_app(model: ServedModel, api_key: str = "", max_body_bytes: int = 8 << 20) -> Guards:
  """The app wrapped in Guards (API key, body limit); `.app` is the FastAPI app inside."""

  @contextlib.asynccontextmanager
  async def lifespan(_: FastAPI):
    yield
    model.batcher.close()

  app = FastAPI(title="maxtext OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None)
  errors.install(app)
  guarded = Guards(app, api_key=api_key, max_body_bytes=max_body_bytes)
  throughput = metrics.Throughput()

  @app.get("/health")
  async def health() -> dict:
    return {"status": "ok"}

  @app.get("/metrics")
  async def get_metrics() -> PlainTextResponse:
    stats = model.batcher.stats
    cache = getattr(model.batcher, "prefix_cache_stats", None)
    text = metrics.render(stats, dict(guarded.responses), throughput.rate(stats.generated_tokens),
                          cache() if callable(cache) else None)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

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

  tokenizer_routes.install(app, model)
  return guarded
