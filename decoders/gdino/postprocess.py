"""Post-processing of GroundingDINO outputs into per-sample results in original image pixels.

Each group (category) is read in one of three modes:

- ``"det"``: detection / instance segmentation; the top-k (query, category) pairs over the sample's det groups,
  kept above the score threshold.
- ``"grounding"``: referring expressions, grounding and interactive (region-prompted) segmentation; the single best
  query of each group, whatever its score.
- ``"semantic"``: semantic segmentation over the sample's semantic groups, Mask2Former style:
  ``argmax_g sum_q sigmoid(cls[q, g]) * sigmoid(mask[q])``; a pixel whose best score is below the threshold belongs
  to no group (-1, background).

Boxes are predicted as ``(cx, cy, w, h)`` relative to the unpadded image, so they scale straight to the original
size. Masks are predicted at stride 4 of the padded canvas: upsampled to the canvas, cropped to the resized image and
resized to the original size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from transformers.image_transforms import center_to_corners_format

__all__ = [
    "MODES",
    "boxes_to_original",
    "masks_to_original",
    "masks_to_rle",
    "select_detections",
    "semantic_to_original",
]

MODES = ("det", "grounding", "semantic")
DET, GROUNDING, SEMANTIC = range(3)


def select_detections(
    probs: torch.Tensor, modes: torch.Tensor, topk: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick the (query, group) pairs reported for one sample.

    Args:
        probs: ``[Q, G]`` sigmoid scores (0 on padding groups).
        modes: ``[G]`` long mode codes (index into :data:`MODES`; -1 = padding group).
        topk: detections kept over the det groups.
        threshold: det detections need a score above it.

    Returns:
        ``query_idx`` ``[n]``, ``labels`` ``[n]`` (group indices) and ``scores`` ``[n]``: det detections by falling
        score, then one per grounding group in group order.
    """
    num_queries, num_groups = probs.shape
    det_probs = probs.masked_fill(modes[None] != DET, -1.0)  # [Q, G]
    k = min(topk, det_probs.numel())
    det_scores, flat = det_probs.flatten().topk(k)  # [k]
    keep = det_scores > threshold
    det_scores, flat = det_scores[keep], flat[keep]
    grounding_groups = (modes == GROUNDING).nonzero().flatten()  # [n_g]
    grounding_scores, grounding_queries = probs[:, grounding_groups].max(0)  # [n_g]
    query_idx = torch.cat([flat // num_groups, grounding_queries])
    labels = torch.cat([flat % num_groups, grounding_groups])
    return query_idx, labels, torch.cat([det_scores, grounding_scores])


def boxes_to_original(boxes: torch.Tensor, orig_size: tuple[int, int]) -> torch.Tensor:
    """Normalised ``(cx, cy, w, h)`` ``[n, 4]`` -> xyxy pixels ``[n, 4]`` of the original (h, w) image, clipped."""
    height, width = orig_size
    scale = boxes.new_tensor([width, height, width, height])
    corners = center_to_corners_format(boxes) * scale  # [n, 4]
    return torch.minimum(corners.clamp(min=0), scale)


def _to_original(
    maps: torch.Tensor, canvas: tuple[int, int], image_size: tuple[int, int], orig_size: tuple[int, int]
) -> torch.Tensor:
    """Resample stride-4 canvas maps ``[n, h, w]`` to the original image ``[n, H, W]`` (bilinear)."""
    if maps.shape[0] == 0:
        return maps.new_zeros(0, *orig_size)
    upsampled = F.interpolate(maps[None], size=canvas, mode="bilinear", align_corners=False)
    cropped = upsampled[..., : image_size[0], : image_size[1]]
    return F.interpolate(cropped, size=orig_size, mode="bilinear", align_corners=False)[0]  # [n, H, W]


def masks_to_original(
    mask_logits: torch.Tensor,
    canvas: tuple[int, int],
    image_size: tuple[int, int],
    orig_size: tuple[int, int],
    threshold: float = 0.5,
) -> torch.Tensor:
    """Binary masks at the original size.

    Args:
        mask_logits: ``[n, h, w]`` logits over the padded canvas at stride 4.
        canvas: padded (h, w) of the batch.
        image_size: resized (h, w) of this image (its top-left part of the canvas).
        orig_size: original (h, w).
        threshold: on the sigmoid.

    Returns:
        ``[n, H, W]`` bool.
    """
    return _to_original(mask_logits.float(), canvas, image_size, orig_size).sigmoid() > threshold


def semantic_to_original(
    class_probs: torch.Tensor,
    mask_logits: torch.Tensor,
    canvas: tuple[int, int],
    image_size: tuple[int, int],
    orig_size: tuple[int, int],
    threshold: float = 0.0,
) -> torch.Tensor:
    """Semantic map from per-query class scores and masks (Mask2Former's semantic inference).

    Args:
        class_probs: ``[Q, Gs]`` sigmoid scores of the semantic groups.
        mask_logits: ``[Q, h, w]``.
        canvas, image_size, orig_size: as in :func:`masks_to_original`.
        threshold: pixels whose best class score is lower belong to no class.

    Returns:
        ``[H, W]`` long, the index (into the ``Gs`` semantic groups) of each pixel's class, -1 for none.
    """
    per_class = torch.einsum("qg,qhw->ghw", class_probs.float(), mask_logits.float().sigmoid())  # [Gs, h, w]
    score, best = _to_original(per_class, canvas, image_size, orig_size).max(0)  # [H, W], [H, W]
    return torch.where(score >= threshold, best, -1)


def masks_to_rle(masks: torch.Tensor) -> list[dict]:
    """COCO run-length encodings (``pycocotools.mask.encode``) of ``[n, H, W]`` bool masks."""
    if masks.shape[0] == 0:
        return []
    array = np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8))  # [H, W, n]
    return mask_utils.encode(array)
