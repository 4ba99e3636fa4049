"""Request bodies (pydantic). Unknown fields are refused so that a setting the server would ignore is an error,
not a surprise; message content is checked by :mod:`vllm2.serve.inputs`, which names the part at fault."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

__all__ = ["ChatRequest", "ImageRequest", "Message", "StreamOptions"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Strict):
    """One chat message; ``content`` is a string or a list of ``text`` / ``image_url`` parts."""

    role: StrictStr
    content: Any = None
    name: StrictStr | None = None  # accepted and ignored


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class ChatRequest(_Strict):
    """``POST /v1/chat/completions``: the OpenAI fields this server honours (``user`` is accepted and ignored)."""

    model: StrictStr
    messages: list[Message]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: StrictStr | None = None


class ImageRequest(_Strict):
    """``POST /v1/images/generations`` (JSON) and the text fields of ``POST /v1/images/edits`` (multipart).

    ``size``, ``quality``, ``style`` and ``user`` are accepted and ignored: images come at the decoder's resolution.
    """

    prompt: StrictStr
    model: StrictStr | None = None
    n: int = 1
    response_format: Literal["b64_json"] | None = None
    output_format: Literal["png"] | None = None
    size: StrictStr | None = None
    quality: StrictStr | None = None
    style: StrictStr | None = None
    user: StrictStr | None = None
