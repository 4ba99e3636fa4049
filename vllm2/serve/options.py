"""The server's settings (the ``vllm2 serve`` flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ServeOptions"]


@dataclass
class ServeOptions:
    """Settings of one server.

    Attributes:
        model_name: the model id clients send in ``model`` (and ``GET /v1/models`` lists).
        api_key: with a key, every ``/v1`` request needs ``Authorization: Bearer KEY``.
        max_batch: most requests in one batched ``chat`` call.
        batch_wait_ms: a batch closes when this long passes without a new request (or at max_batch).
        allow_paths: roots under which ``image_url`` may name local files (none: local files are refused).
        max_tokens_cap: the largest ``max_tokens`` accepted (also the default).
        max_request_bytes: the largest request body accepted.
        max_images: images per conversation (the decoders see the first image of a request).
        gen_kwargs: further :func:`vllm2.chat.chat` options for every call (``logits_processor``,
            ``decoder_options``).
    """

    model_name: str = "vllm2"
    api_key: str | None = None
    max_batch: int = 16
    batch_wait_ms: float = 10.0
    allow_paths: tuple[Path, ...] = ()
    max_tokens_cap: int = 512
    max_request_bytes: int = 32 * 2**20
    max_images: int = 1
    gen_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_tokens_cap", "max_request_bytes", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        self.allow_paths = tuple(Path(p).resolve() for p in self.allow_paths)
        for root in self.allow_paths:
            if not root.is_dir():
                raise ValueError(f"allow_paths: {str(root)!r} is not a directory")
