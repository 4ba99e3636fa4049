"""Requests to :class:`Job` objects: messages become the prompt, earlier turns and images; every problem is an
:class:`ApiError` naming the field at fault.

Images: ``data:image/...;base64,`` URLs, or local files (``file://`` URLs or plain paths) under an allowed root.
Remote URLs are never fetched. Every image is checked against the processor's pixel limit before it is decoded.
The images of a message stand at its start (``<image>\\n`` per image), as in training; earlier assistant turns get
their route placeholders back (:func:`vllm2.chat.history_text`), as ``vllm2 chat`` does.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from PIL import Image

from superlink import RouteTable

from ..chat import history_text
from ..data.templates import DEFAULT_PHRASINGS
from ..images import ImageTooLarge, decode_image, load_image
from ..tokenizer import IMAGE_TOKEN, PATCH_TOKEN, REGION_TOKEN
from .batcher import Job
from .errors import ApiError
from .options import ServeOptions
from .schema import ChatRequest, ImageRequest, Message

if TYPE_CHECKING:
    from ..processor import VisionLLMv2Processor

__all__ = ["Rules", "chat_job", "decode_upload", "image_job"]

IMAGE_ANSWER_TOKENS = 64  # token budget of the answer to an images request ("Here it is [GEN].")
_DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),(.*)$", re.DOTALL)


@dataclass(frozen=True)
class Rules:
    """What a request may ask for: the served name, limits, and the route table of the model."""

    model_name: str
    max_tokens_cap: int
    max_images: int
    max_pixels: int
    allow_paths: tuple[Path, ...]
    vocab_size: int
    routes: RouteTable

    @classmethod
    def of(cls, processor: VisionLLMv2Processor, options: ServeOptions) -> Rules:
        return cls(options.model_name, options.max_tokens_cap, options.max_images, processor.vision.max_image_pixels,
                   options.allow_paths, len(processor.tokenizer), processor.routes)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(f"unknown model {name!r}: this server serves {self.model_name!r}", "model",
                           "model_not_found")

    def check_text(self, text: str, param: str, routes_allowed: bool = False) -> str:
        """Refuse the special tokens only the server writes (image, patch and region markers, placeholders; route
        tokens too, except in earlier assistant turns)."""
        reserved = [IMAGE_TOKEN, PATCH_TOKEN, REGION_TOKEN, *self.routes.placeholder_tokens]
        found = [t for t in reserved + ([] if routes_allowed else list(self.routes.route_tokens)) if t in text]
        if found:
            raise ApiError(f"{param} contains the special token(s) {found}, which only the server writes (send "
                           "images as image_url parts)", param, "special_token")
        return text


def chat_job(req: ChatRequest, rules: Rules) -> Job:
    """The job of a chat request (images decoded, settings checked)."""
    rules.check_model(req.model)
    if req.n != 1:
        raise ApiError("n must be 1: one answer per request", "n", "invalid_value")
    prompt, history, images = _conversation(req.messages, rules)
    temperature = req.temperature or 0.0
    return Job(prompt, images, history, _max_tokens(req, rules), temperature,
               1.0 if req.top_p is None else req.top_p, _logit_bias(req.logit_bias, rules))


def image_job(req: ImageRequest, rules: Rules, image: Image.Image | None) -> Job:
    """The job of an image generation (no image) or edit request: the prompt in the training phrasing of the task."""
    rules.check_model(req.model)
    if req.n != 1:
        raise ApiError("n must be 1: one image per request", "n", "invalid_value")
    text = rules.check_text(req.prompt, "prompt").strip().rstrip(".")
    if not text:
        raise ApiError("prompt is empty", "prompt", "invalid_value")
    if image is None:
        prompt = DEFAULT_PHRASINGS["t2i_question"][0].format(caption=text)
    else:
        prompt = DEFAULT_PHRASINGS["edit_question"][0].format(instruction=text)
    return Job(prompt, [image] if image is not None else [], max_tokens=min(IMAGE_ANSWER_TOKENS, rules.max_tokens_cap))


def decode_upload(data: bytes, param: str, rules: Rules) -> Image.Image:
    """An uploaded image file, decoded (400 when not an image or over the pixel limit)."""
    try:
        return decode_image(data, rules.max_pixels, param)
    except ImageTooLarge as err:
        raise ApiError(str(err), param, "image_too_large") from None
    except ValueError as err:
        raise ApiError(f"{param} is not a readable image: {err}", param, "invalid_image") from None


def _max_tokens(req: ChatRequest, rules: Rules) -> int:
    field, value = ("max_completion_tokens", req.max_completion_tokens) if req.max_completion_tokens is not None \
        else ("max_tokens", req.max_tokens)
    if value is None:
        return rules.max_tokens_cap
    if not 1 <= value <= rules.max_tokens_cap:
        raise ApiError(f"{field} must lie in [1, {rules.max_tokens_cap}], got {value}", field, "invalid_value")
    return value


def _logit_bias(bias: dict[str, float] | None, rules: Rules) -> dict[int, float]:
    out = {}
    for key, value in (bias or {}).items():
        if not key.isdigit() or int(key) >= rules.vocab_size or not -100 <= value <= 100:
            raise ApiError(f"logit_bias: {key!r}: {value} needs a token id below {rules.vocab_size} and a value in "
                           "[-100, 100]", "logit_bias", "invalid_value")
        out[int(key)] = value
    return out


def _conversation(messages: list[Message], rules: Rules) -> tuple[str, list[tuple[str, str]], list[Image.Image]]:
    """The last user message, the earlier turns and every image in order."""
    if not messages:
        raise ApiError("messages is empty: send at least one user message", "messages", "missing_messages")
    turns: list[tuple[str, str]] = []
    images: list[Image.Image] = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role in ("system", "developer"):
            raise ApiError(f"{param}: {message.role} messages are not supported (the model's template has a fixed "
                           "system prompt)", f"{param}.role", "unsupported_role")
        if message.role not in ("user", "assistant"):
            raise ApiError(f"{param}: unknown role {message.role!r} (user and assistant are served)",
                           f"{param}.role", "invalid_role")
        if message.role != expected:
            raise ApiError(f"{param}: expected a {expected} message (messages alternate user, assistant, ..., "
                           "starting with user)", f"{param}.role", "invalid_role")
        if message.role == "user":
            turns.append(("user", _user_text(message.content, f"{param}.content", rules, images)))
        else:
            text = rules.check_text(_assistant_text(message.content, f"{param}.content"), f"{param}.content", True)
            turns.append(("assistant", history_text(text, rules.routes)))
    if turns[-1][0] != "user":
        raise ApiError("the last message must be a user message", f"messages[{len(messages) - 1}].role",
                       "invalid_role")
    return turns[-1][1], turns[:-1], images


def _user_text(content: Any, param: str, rules: Rules, images: list[Image.Image]) -> str:
    """A user message as the model's text (``<image>\\n`` per image first); appends its images to ``images``."""
    if isinstance(content, str):
        return rules.check_text(content, param)
    if not isinstance(content, list) or not content:
        raise ApiError(f"{param} must be a string or a non-empty list of parts", param, "invalid_value")
    texts, count = [], 0
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(rules.check_text(part["text"], f"{where}.text"))
        elif kind == "image_url":
            url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
            if not isinstance(url, str):
                raise ApiError(f"{where}.image_url.url must be a string", f"{where}.image_url.url", "invalid_value")
            if len(images) >= rules.max_images:
                raise ApiError(f"{where}: this model takes {rules.max_images} image(s) per conversation",
                               where, "too_many_images")
            images.append(_image(url, f"{where}.image_url.url", rules))
            count += 1
        else:
            raise ApiError(f"{where} must be a text part or an image_url part", f"{where}.type", "invalid_value")
    return f"{IMAGE_TOKEN}\n" * count + "\n".join(texts)


def _assistant_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(f"{param}: an assistant message must be a string or text parts", param, "invalid_value")


def _image(url: str, param: str, rules: Rules) -> Image.Image:
    """The image an ``image_url`` names: a base64 data URL, or a local file under an allowed root."""
    if url.startswith("data:"):
        match = _DATA_URL.match(url)
        if match is None or ";base64" not in match[2]:
            raise ApiError(f"{param}: a data URL must read data:image/...;base64,...", param, "invalid_image")
        if not match[1].startswith("image/"):
            raise ApiError(f"{param}: content type {match[1] or 'text/plain'!r} is not an image type", param,
                           "invalid_content_type")
        try:
            data = base64.b64decode(match[3], validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(f"{param}: the data URL is not valid base64", param, "invalid_image") from None
        return decode_upload(data, param, rules)
    parsed = urlparse(url)
    if parsed.scheme not in ("", "file"):
        raise ApiError(f"{param}: {parsed.scheme} URLs are not fetched; send the image as a data URL", param,
                       "unsupported_url")
    return _local_image(Path(unquote(parsed.path) if parsed.scheme else url), param, rules)


def _local_image(path: Path, param: str, rules: Rules) -> Image.Image:
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in rules.allow_paths):
        raise ApiError(f"{param}: local file {str(path)!r} is not under an allowed root (start the server with "
                       "--allow-path ROOT to serve local files)", param, "path_not_allowed")
    try:
        return load_image(resolved, rules.max_pixels)
    except ImageTooLarge as err:
        raise ApiError(str(err), param, "image_too_large") from None
    except (FileNotFoundError, ValueError) as err:
        raise ApiError(f"{param}: {err}", param, "invalid_image") from None
