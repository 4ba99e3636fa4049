"""HTTP plumbing: the request-size limit, the API key, JSON bodies, and every error as an OpenAI error object."""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any, Awaitable, Callable, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_body, from_validation

__all__ = ["BodyLimit", "install_error_handlers", "parse", "read_json", "require_key"]

logger = logging.getLogger(__name__)

Model = TypeVar("Model", bound=BaseModel)


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is answered 400 before the app sees it.

    The body is read once and replayed to the app; later ``receive`` calls (a client's disconnect) pass through.
    A refused body is read on (and dropped) up to ``8 * limit`` bytes so the client can read the answer.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        size, chunks, more = 0, [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size <= self.limit:
                chunks.append(message.get("body", b""))
            more = message.get("more_body", False) and size <= 8 * self.limit
        if size > self.limit or (declared.isdigit() and int(declared) > self.limit):
            body = error_body(f"the request body is over the limit of {self.limit} bytes (--max-request-bytes)",
                              None, "request_too_large")
            await JSONResponse(body, status_code=400)(scope, receive, send)
            return
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that first returns the whole body, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def require_key(key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency: 401 unless ``Authorization: Bearer KEY`` (nothing to check without a key)."""

    async def check(request: Request) -> None:
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError("invalid or missing API key: send the header 'Authorization: Bearer KEY'", None,
                           "invalid_api_key", status=401)

    return check


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object (400 for another content type or malformed JSON)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(f"Content-Type must be application/json, got {content_type or 'none'!r}", None,
                       "invalid_content_type")
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(f"the body is not valid JSON: {err}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError("the body must be a JSON object", None, "invalid_json")
    return body


def parse(model: type[Model], data: dict[str, Any]) -> Model:
    """``data`` validated as ``model`` (400 naming the first field at fault)."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise from_validation(err) from None


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error with an OpenAI error object."""

    async def api_error(request: Request, err: Exception) -> JSONResponse:
        return err.response()  # type: ignore[attr-defined]

    async def http_error(request: Request, err: Exception) -> JSONResponse:
        status = getattr(err, "status_code", 400)
        return ApiError(str(getattr(err, "detail", err)), None, None, status,
                        "invalid_request_error" if status < 500 else "server_error").response()

    async def crash(request: Request, err: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        return ApiError(f"internal error: {err}", None, "internal_error", 500, "server_error").response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, crash)
