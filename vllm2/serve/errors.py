"""OpenAI-style errors: one exception type for everything a request can get wrong, and its JSON body."""

from __future__ import annotations

from typing import Any, Sequence

from fastapi.responses import JSONResponse
from pydantic import ValidationError

__all__ = ["ApiError", "error_body", "field_path", "from_validation"]


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict[str, Any]:
    """The OpenAI error object ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ApiError(Exception):
    """A request the server refuses, or a failure it reports.

    Args:
        message: what went wrong, for a person.
        param: the request field at fault (``messages[0].content[1].image_url.url``), or None.
        code: a short machine-readable code (``invalid_image``, ``image_too_large``, ...).
        status: the HTTP status (400 for bad requests).
        kind: the error ``type`` (``invalid_request_error``, ``server_error``).
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.param, self.code, self.kind)

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def field_path(loc: Sequence[int | str]) -> str:
    """``("messages", 0, "content")`` -> ``"messages[0].content"``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def from_validation(err: ValidationError, prefix: Sequence[int | str] = ()) -> ApiError:
    """The first problem pydantic found, as an :class:`ApiError` naming its field."""
    first = err.errors()[0]
    param = field_path([*prefix, *first["loc"]])
    if first["type"] == "extra_forbidden":
        return ApiError(f"unsupported field {param!r}", param, "unsupported_field")
    if first["type"] == "missing":
        return ApiError(f"missing required field {param!r}", param, "missing_field")
    return ApiError(f"{param}: {first['msg']}", param, "invalid_value")
