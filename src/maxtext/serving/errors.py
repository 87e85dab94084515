"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the status OpenAI uses."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
  """An error answered to the client as OpenAI does; raise it anywhere a request is handled."""

  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
               error_type: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.type = status, message, param, code, error_type

  def body(self) -> dict[str, Any]:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
  return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
  return APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")


def context_length_exceeded(max_context: int, prompt_tokens: int, max_tokens: int, param: str) -> APIError:
  return APIError(
      400,
      f"This model's maximum context length is {max_context} tokens, however you requested"
      f" {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {param}, {max_tokens} for the completion)."
      f" Please reduce the length of the {param} or the completion.",
      param=param, code="context_length_exceeded",
  )


def _validation_error(exc: RequestValidationError) -> APIError:
  """Pydantic's first complaint as one OpenAI 400 naming the parameter."""
  first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
  loc = [str(part) for part in first.get("loc", ()) if part != "body"]
  param = ".".join(loc) or None
  kind = first.get("type", "")
  if kind == "json_invalid":
    return APIError(400, "The request body is not valid JSON.", code="invalid_json")
  if kind == "extra_forbidden":
    return APIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
  if kind == "missing":
    return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
  if not loc:
    return APIError(400, f"Invalid request body: {first.get('msg')}", code="invalid_value")
  return APIError(400, f"Invalid value for '{param}': {first.get('msg')}", param=param, code="invalid_value")


def install(app: FastAPI) -> None:
  """Every error the app answers, including FastAPI's own (validation, unknown route), in OpenAI's shape."""

  @app.exception_handler(APIError)
  async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)

  @app.exception_handler(RequestValidationError)
  async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    error = _validation_error(exc)
    return JSONResponse(error.body(), status_code=error.status)

  @app.exception_handler(StarletteHTTPException)
  async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
    error = APIError(exc.status_code, str(exc.detail), code=code)
    return JSONResponse(error.body(), status_code=exc.status_code)

  @app.exception_handler(Exception)
  async def _internal(_: Request, exc: Exception) -> JSONResponse:
    error = APIError(500, f"internal error: {type(exc).__name__}: {exc}", error_type="server_error", code=None)
    return JSONResponse(error.body(), status_code=500)
