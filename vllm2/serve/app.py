"""The FastAPI app: routes, the lifespan of the batching worker, and waiting for answers."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from .. import __version__
from ..chat import ChatResult
from .batcher import Batcher, Job, Runner
from .errors import ApiError
from .http import BodyLimit, install_error_handlers, parse, read_json, require_key
from .inputs import Rules, chat_job, decode_upload, image_job
from .options import ServeOptions
from .outputs import Meta, chunk, chunks, completion, png_base64
from .schema import ChatRequest, ImageRequest

if TYPE_CHECKING:
    from ..modeling import VisionLLMv2Model
    from ..processor import VisionLLMv2Processor

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

CLIENT_GONE = 499  # the status logged for a request whose client left before its answer
_POLL_S = 0.25  # how often a waiting request checks that its client is still there


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


class Handlers:
    """The endpoints, around one batching worker.

    Args:
        batcher: the worker that owns the model.
        rules: what requests may ask for.
    """

    def __init__(self, batcher: Batcher, rules: Rules) -> None:
        self.batcher, self.rules = batcher, rules
        self.created = int(time.time())

    async def health(self) -> dict[str, Any]:
        alive = self.batcher.alive
        status = "ok" if all(alive) else "degraded" if any(alive) else "failed"
        return {"status": status, "model": self.rules.model_name, "pending": self.batcher.pending,
                "batches": self.batcher.runner_batches, "replicas_alive": alive}

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.rules.model_name, "object": "model", "created": self.created,
                                            "owned_by": "vllm2"}]}

    async def chat(self, request: Request) -> Response:
        """``POST /v1/chat/completions`` (``stream`` answers with server-sent events)."""
        with self.batcher.arriving():
            req = parse(ChatRequest, await read_json(request))
            job = await run_in_threadpool(chat_job, req, self.rules)
            future = self._submit(job)
        meta = Meta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.rules.model_name)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._events(future, meta, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        result = await self._wait(request, future)
        return Response(status_code=CLIENT_GONE) if result is None else JSONResponse(completion(result, meta))

    async def generations(self, request: Request) -> Response:
        """``POST /v1/images/generations``: the prompt as a text-to-image request."""
        with self.batcher.arriving():
            job = image_job(parse(ImageRequest, await read_json(request)), self.rules, None)
            future = self._submit(job)
        return await self._image(request, job, future, "t2i")

    async def edits(self, request: Request) -> Response:
        """``POST /v1/images/edits`` (multipart ``image`` + ``prompt``): the prompt as an edit instruction."""
        with self.batcher.arriving():
            req, data = await self._edit_form(request)
            job = image_job(req, self.rules, await run_in_threadpool(decode_upload, data, "image", self.rules))
            future = self._submit(job)
        return await self._image(request, job, future, "edit")

    def _submit(self, job: Job) -> Future:
        try:
            return self.batcher.submit(job)
        except RuntimeError as err:
            raise ApiError(str(err), None, "shutting_down", 503, "server_error") from None

    async def _wait(self, request: Request, future: Future) -> ChatResult | None:
        """The answer, or None when the client left first (its job is then cancelled if not yet running)."""
        waiter = asyncio.wrap_future(future)
        while not (await asyncio.wait({waiter}, timeout=_POLL_S))[0]:
            if await request.is_disconnected():
                waiter.cancel()
                return None
        return await self._outcome(waiter)

    async def _outcome(self, waiter: asyncio.Future) -> ChatResult:
        try:
            return await waiter
        except ValueError as err:  # the processor refused the conversation
            raise ApiError(f"the model cannot take this request: {err}", "messages", "invalid_request") from None
        except Exception as err:
            logger.exception("a request failed")
            raise ApiError(f"the model failed: {err}", None, "model_error", 500, "server_error") from None

    async def _events(self, future: Future, meta: Meta, usage: bool) -> AsyncIterator[str]:
        """Server-sent events: the role, then (once answered) the text deltas, the route outputs, ``[DONE]``.
        A client that leaves cancels the wait, and with it a job that has not started."""
        yield _sse(chunk(meta, {"role": "assistant", "content": ""}))
        try:
            result = await self._outcome(asyncio.wrap_future(future))
        except ApiError as err:
            yield _sse(err.body())
            return
        for item in chunks(result, meta, usage):
            yield _sse(item)
        yield "data: [DONE]\n\n"

    async def _edit_form(self, request: Request) -> tuple[ImageRequest, bytes]:
        """The text fields and the image bytes of an edit request."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "multipart/form-data":
            raise ApiError(f"Content-Type must be multipart/form-data, got {content_type or 'none'!r}", None,
                           "invalid_content_type")
        form = await request.form(max_files=4, max_fields=32)
        if "mask" in form:
            raise ApiError("masks are not supported: describe the edit in the prompt", "mask", "unsupported_field")
        files = form.getlist("image") + form.getlist("image[]")
        if len(files) != 1:
            raise ApiError(f"send exactly one image (this model edits one image), got {len(files)}", "image",
                           "invalid_value" if files else "missing_field")
        if not isinstance(files[0], UploadFile):
            raise ApiError("image must be a file", "image", "invalid_image")
        fields = {key: value for key, value in form.multi_items() if key not in ("image", "image[]")}
        for key, value in fields.items():
            if not isinstance(value, str):
                raise ApiError(f"{key} must be a text field", key, "invalid_value")
        return parse(ImageRequest, fields), await files[0].read()

    async def _image(self, request: Request, job: Job, future: Future, task: str) -> Response:
        """Answer an images request with the image of the task's route (400 when the model did not route to it)."""
        result = await self._wait(request, future)
        if result is None:
            return Response(status_code=CLIENT_GONE)
        route = self.rules.routes.route_for_task(task)
        output = next((o for o in result.outputs if o.route == route), None)
        if output is None:
            raise ApiError(f"the model did not route to {route}: it answered {result.text!r} to {job.prompt!r}",
                           "prompt", "not_routed")
        if output.error or not isinstance(output.result, Image.Image):
            raise ApiError(output.error or f"the {output.decoder} decoder made no image", None, "decoder_error",
                           500, "server_error")
        return JSONResponse({"created": int(time.time()),
                             "data": [{"b64_json": png_base64(output.result), "revised_prompt": job.prompt}]})


def create_app(model: VisionLLMv2Model | None, processor: VisionLLMv2Processor,
               options: ServeOptions | None = None, replicas: Sequence[Runner] = ()) -> FastAPI:
    """The server's app; its lifespan starts the batching worker and, at shutdown, answers what is queued.

    Args:
        model: the model (in eval mode); only the worker thread uses it. None with ``replicas``.
        processor: its processor.
        options: the server settings (defaults: :class:`ServeOptions`).
        replicas: model replicas in other processes (:class:`.replicas.Replica`) that answer instead of ``model``.
    Returns:
        A FastAPI app for uvicorn. ``app.state.batcher`` is the worker.
    """
    options = options or ServeOptions()
    batcher = Batcher(model, processor, options.max_batch, options.batch_wait_ms / 1000, options.gen_kwargs,
                      replicas)
    handlers = Handlers(batcher, Rules.of(processor, options))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.close)

    app = FastAPI(title="vllm2", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, limit=options.max_request_bytes)
    install_error_handlers(app)
    auth = [Depends(require_key(options.api_key))]
    app.add_api_route("/health", handlers.health, methods=["GET"])
    app.add_api_route("/v1/models", handlers.models, methods=["GET"], dependencies=auth)
    app.add_api_route("/v1/chat/completions", handlers.chat, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/images/generations", handlers.generations, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/images/edits", handlers.edits, methods=["POST"], dependencies=auth)
    return app
