"""Every error the service answers, in one place: what it refuses (Problem), what the engine
fails with (EngineError and its kinds), the body each API answers them with, and how the OpenAPI
document describes them.

OpenAI's routes (and the service's own) answer `{"error": {message, type, param, code}}`, as
OpenAI's clients expect. A1111's routes answer `{"error", "detail", "param", "errors"}`: `error`
is the code, `detail` the message, `errors` the validation errors (empty when there are none).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(
        description="invalid_request_error, authentication_error, rate_limit_error or server_error"
    )
    param: str | None = Field(description="The request field at fault, dotted for nested ones.")
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class A1111Error(BaseModel):
    error: str = Field(description="A short code, e.g. invalid_value, queue_full.")
    detail: str = Field(description="What is wrong, naming the field.")
    param: str | None = Field(description="The request field at fault.")
    errors: list[FieldError] = Field(description="Every validation error; empty for other errors.")


class Problem(Exception):
    """A request the service refuses: a status, a message, and `param`, the field at fault."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 422,
        code: str = "invalid_value",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code
        self.headers = headers or {}


class AuthError(Problem):
    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            status=401,
            code="invalid_api_key",
            headers={"WWW-Authenticate": 'Bearer realm="sdserve", Basic realm="sdserve"'},
        )


class EngineError(Problem):
    """What the engine fails a request with; each kind has its status and code."""

    status = 503
    code = "engine_error"
    retry_after: str | None = "5"

    def __init__(self, message: str) -> None:
        headers = {"Retry-After": self.retry_after} if self.retry_after else {}
        super().__init__(message, status=type(self).status, code=type(self).code, headers=headers)


class QueueFull(EngineError):
    status, code, retry_after = 429, "queue_full", "1"


class KeyQueueFull(QueueFull):
    code = "key_queue_full"


class NotReady(EngineError):
    code = "not_ready"


class Draining(EngineError):
    code = "shutting_down"


class OutOfMemory(EngineError):
    code = "out_of_memory"


class Cancelled(EngineError):
    status, code, retry_after = 499, "cancelled", None


class GenerationFailed(EngineError):
    status, code, retry_after = 500, "generation_failed", None


class InputFailed(EngineError):
    """A request whose generation failed alone, on its own input, while its batch-mates succeeded."""

    status, code, retry_after = 422, "invalid_input", None


class TimedOut(EngineError):
    status, code, retry_after = 504, "timeout", None


def error_type(status: int) -> str:
    if status in (401, 403):
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def is_a1111(path: str) -> bool:
    return path.startswith("/sdapi/")


def error_body(
    path: str,
    message: str,
    param: str | None,
    code: str | None,
    status: int,
    errors: list[dict[str, Any]] | None = None,
) -> dict:
    """The error body for a request to `path`, in its API's one shape."""
    if is_a1111(path):
        return {
            "error": code or error_type(status),
            "detail": message,
            "param": param,
            "errors": errors or [],
        }
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


_WHY = {
    400: "Malformed JSON, or a body that is not a JSON object.",
    401: "No API key, or a wrong one (`WWW-Authenticate: Bearer, Basic`).",
    404: "No such model, job or image.",
    408: "The request body did not arrive within SDSERVE_READ_TIMEOUT_S.",
    413: "The body is larger than SDSERVE_MAX_BODY_BYTES.",
    422: "A field is invalid or cannot be honoured; `param` names it.",
    429: "The queue, this key's share of it, or the job store is full (`Retry-After`).",
    500: "The generation failed on the server.",
    503: "Not ready, draining, or one image does not fit in GPU memory (`Retry-After`).",
    504: "Not done within SDSERVE_REQUEST_TIMEOUT_S; use POST /v1/jobs for long work.",
}


def responses(*statuses: int, a1111: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route can answer, in its API's shape."""
    model = A1111Error if a1111 else OpenAIError
    return {status: {"model": model, "description": _WHY[status]} for status in statuses}


# What every route with a JSON body can answer besides its own errors.
BODY = (400, 408, 413, 422)
