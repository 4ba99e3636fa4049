"""Answers to OpenAI JSON: completions, stream chunks, and the route outputs of the ``vllm2_outputs`` field."""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..bench.metrics_coco import encode_masks
from ..bench.metrics_ground import to_numpy
from ..chat import ChatResult, RouteOutput

__all__ = ["EXTENSION", "Meta", "chunks", "completion", "output_json", "png_base64"]

EXTENSION = "vllm2_outputs"  # the extension field of each choice (see the vllm2.serve docstring)
_SKIPPED = ("masks", "rles", "semantic")  # sent as RLE, not as raw lists


@dataclass(frozen=True)
class Meta:
    """What every object of one response repeats: its id, creation time and model name."""

    id: str
    created: int
    model: str


def png_base64(image: Image.Image) -> str:
    """A PIL image as base64-encoded PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _rle(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes)
            else counts}


def _result_json(result: dict[str, Any]) -> dict[str, Any]:
    """Boxes, scores, labels, keypoints as lists; masks as COCO RLE; a semantic map as one RLE per group."""
    data: dict[str, Any] = {}
    for key, value in result.items():
        if key not in _SKIPPED:
            data[key] = to_numpy(value).tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else value
    if result.get("rles") is not None:
        data["masks"] = [_rle(r) for r in result["rles"]]
    elif result.get("masks") is not None:
        data["masks"] = encode_masks(to_numpy(result["masks"]).astype(bool))
    if result.get("semantic") is not None:
        semantic = to_numpy(result["semantic"])  # [H, W] group index, -1 background
        groups = [int(g) for g in np.unique(semantic[semantic >= 0])]
        masks = encode_masks(np.stack([semantic == g for g in groups])) if groups else []
        data["semantic"] = [{"label": g, "mask": m} for g, m in zip(groups, masks)]
    return data


def output_json(output: RouteOutput) -> dict[str, Any]:
    """One route output: route, decoder, phrases, error, and what the decoder found (boxes..., or ``image``)."""
    data: dict[str, Any] = {"route": output.route, "decoder": output.decoder, "phrases": output.phrases,
                            "error": output.error}
    if isinstance(output.result, Image.Image):
        data["image"] = png_base64(output.result)
    elif isinstance(output.result, dict):
        data.update(_result_json(output.result))
    return data


def usage(result: ChatResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.num_tokens,
            "total_tokens": result.prompt_tokens + result.num_tokens}


def completion(result: ChatResult, meta: Meta) -> dict[str, Any]:
    """The ``chat.completion`` object of one answer."""
    choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
              "finish_reason": result.finish_reason, EXTENSION: [output_json(o) for o in result.outputs]}
    return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": [choice], "usage": usage(result)}


def chunk(meta: Meta, delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with a single choice."""
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, **extra}
    return {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
            "choices": [choice]}


def chunks(result: ChatResult, meta: Meta, include_usage: bool) -> list[dict[str, Any]]:
    """The chunks after the first (role) one: text deltas (word by word), then the finish reason with the route
    outputs, then the usage when asked for."""
    out = [chunk(meta, {"content": piece}) for piece in re.findall(r"\s*\S+", result.text)]
    out.append(chunk(meta, {}, result.finish_reason, **{EXTENSION: [output_json(o) for o in result.outputs]}))
    if include_usage:
        out.append({**chunk(meta, {}), "choices": [], "usage": usage(result)})
    return out
