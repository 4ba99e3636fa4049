"""Post-processing of keypoint decoder outputs into per-image results, and COCO keypoint formatting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.ops import box_convert

from .criterion import LayerOutput

__all__ = ["postprocess", "to_coco_keypoints", "to_coco_results"]


def postprocess(
    out: LayerOutput,
    class_mask: torch.Tensor,
    keypoint_mask: torch.Tensor,
    orig_sizes: torch.Tensor,
    top_k: int = 100,
    score_threshold: float = 0.0,
) -> list[dict[str, torch.Tensor]]:
    """Top-k (instance, object group) pairs per image, in original image pixels.

    Args:
        out: final-layer predictions (``keypoints`` and ``visibility_logits`` set).
        class_mask: [B, Go] bool, real object groups; keypoint_mask: [B, Kp] bool, real keypoint groups.
        orig_sizes: [B, 2] original (height, width).
        top_k: most results per image (over instances x object groups, as in the official evaluation).
        score_threshold: drop results scoring at or below this.
    Returns:
        Per image: ``boxes`` [n, 4] xyxy, ``scores`` [n], ``labels`` [n] (object-group index) and ``keypoints``
        [n, Kp_i, 3] with (x, y, visibility score), keypoints in the order of the image's [POSE] groups.
    """
    b, q, g = out.logits.shape
    scores = out.logits.float().sigmoid().masked_fill(~class_mask[:, None], 0)  # [B, Q, Go]
    k = min(top_k, q * g)
    top, index = scores.flatten(1).topk(k, dim=1)  # [B, k]
    query, labels = index // g, index % g  # [B, k]
    size_wh = orig_sizes.flip(-1).to(scores.dtype)  # [B, 2]
    boxes = box_convert(out.boxes.float(), "cxcywh", "xyxy") * size_wh.repeat(1, 2)[:, None]  # [B, Q, 4]
    boxes = boxes.gather(1, query[..., None].expand(-1, -1, 4))  # [B, k, 4]
    kp = out.keypoints.shape[2]
    xy = out.keypoints.float() * size_wh[:, None, None]  # [B, Q, Kp, 2]
    vis = out.visibility_logits.float().sigmoid()[..., None]  # [B, Q, Kp, 1]
    keypoints = torch.cat([xy, vis], -1).gather(1, query[..., None, None].expand(-1, -1, kp, 3))  # [B, k, Kp, 3]
    keep = (top > score_threshold) & class_mask.gather(1, labels)  # [B, k]
    counts = keypoint_mask.sum(-1).tolist()
    return [
        {
            "boxes": boxes[i][keep[i]],
            "scores": top[i][keep[i]],
            "labels": labels[i][keep[i]],
            "keypoints": keypoints[i][keep[i]][:, : counts[i]],
        }
        for i in range(b)
    ]


def to_coco_keypoints(keypoints: torch.Tensor) -> list[list[float]]:
    """``[n, Kp, 3]`` (x, y, v) -> COCO keypoint lists ``[x1, y1, v1, x2, y2, v2, ...]`` (one per instance)."""
    if keypoints.dim() != 3 or keypoints.shape[-1] != 3:
        raise ValueError(f"keypoints must be [n, Kp, 3], got {tuple(keypoints.shape)}")
    return keypoints.flatten(1).tolist()


def to_coco_results(
    result: dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """One image's :meth:`KeypointDecoder.predict` result -> COCO keypoint result records.

    Args:
        result: dict with ``scores``, ``labels`` (object-group index) and ``keypoints`` [n, Kp, 3].
        image_id: COCO image id.
        category_ids: dataset category id of each object group, in group order.
    Returns:
        ``[{"image_id", "category_id", "keypoints", "score"}, ...]`` as ``COCO.loadRes`` expects.
    """
    labels = result["labels"].tolist()
    if any(label >= len(category_ids) for label in labels):
        raise ValueError(f"category_ids has {len(category_ids)} entries but a result label is {max(labels)}")
    return [
        {"image_id": image_id, "category_id": int(category_ids[label]), "keypoints": kpts, "score": float(score)}
        for label, kpts, score in zip(labels, to_coco_keypoints(result["keypoints"]), result["scores"].tolist())
    ]
