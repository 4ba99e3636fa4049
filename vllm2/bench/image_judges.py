"""Rule-based judges of images of the shapes world (:mod:`vllm2.shapes`): the dominant colour and the shape class
of a generated image, and whether an edit made the requested change and kept the rest. They read images only; the
``shapes`` judge of ``vllm2 bench gen`` / ``vllm2 bench edit`` and the chat judges (:mod:`.judges`) use them.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from PIL import Image
from scipy import ndimage

from ..data.annotations import mask_to_box
from ..shapes.world import COLOURS, SHAPES, to_uint8

__all__ = ["colour_labels", "dominant_colour", "edit_correct", "shape_class"]

_FILL_SQUARE, _FILL_CIRCLE = 0.9, 0.64  # fill-ratio thresholds of shape_class


def _array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image as float ``[H, W, 3]``."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be RGB [H, W, 3], got shape {arr.shape}")
    return arr


def colour_labels(image: Image.Image | np.ndarray) -> np.ndarray:
    """Per pixel, the index of the nearest palette colour in :data:`COLOURS` order, or -1 where the background (the
    median colour of the image border) is nearer.

    Args:
        image: RGB image (PIL or ``[H, W, 3]``).
    Returns:
        ``[H, W]`` int64 labels.
    """
    arr = _array(image)  # [H, W, 3]
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])  # [P, 3]
    references = np.concatenate([np.median(border, 0)[None], np.asarray(list(COLOURS.values()), np.float64)])  # [5, 3]
    distances = ((arr[:, :, None, :] - references) ** 2).sum(-1)  # [H, W, 5]
    return distances.argmin(-1).astype(np.int64) - 1


def _blobs(labels: np.ndarray, min_pixels: int) -> list[tuple[np.ndarray, int]]:
    """Connected foreground components as ``(mask, majority colour index)``, largest first."""
    components, count = ndimage.label(labels >= 0)
    if count == 0:
        return []
    areas = np.bincount(components.ravel(), minlength=count + 1)[1:]  # [count]
    votes = np.zeros((count + 1, len(COLOURS)), dtype=np.int64)
    fg = components > 0
    np.add.at(votes, (components[fg], labels[fg]), 1)
    order = [int(c) for c in np.argsort(-areas, kind="stable") if areas[c] >= min_pixels]
    return [(components == c + 1, int(votes[c + 1].argmax())) for c in order]


def dominant_colour(image: Image.Image | np.ndarray, min_pixels: int = 4) -> str | None:
    """The colour name of the largest non-background blob (None when there is none)."""
    blobs = _blobs(colour_labels(image), min_pixels)
    return list(COLOURS)[blobs[0][1]] if blobs else None


def shape_class(mask_or_image: Image.Image | np.ndarray, min_pixels: int = 4) -> str | None:
    """The kind of a shape by the fill ratio of its bounding box (square ~1.0, circle ~0.785, triangle ~0.5).

    Args:
        mask_or_image: a bool ``[H, W]`` mask, or an RGB image (its largest non-background blob is classified).
        min_pixels: smaller blobs are ignored.
    Returns:
        ``"square"``, ``"circle"`` or ``"triangle"``; None for an empty mask or an image without a blob.
    """
    if isinstance(mask_or_image, np.ndarray) and mask_or_image.ndim == 2:
        mask = mask_or_image.astype(bool)
    else:
        blobs = _blobs(colour_labels(mask_or_image), min_pixels)
        if not blobs:
            return None
        mask = blobs[0][0]
    if mask.sum() < max(min_pixels, 1):
        return None
    x1, y1, x2, y2 = mask_to_box(mask)
    fill = mask.sum() / ((x2 - x1) * (y2 - y1))
    return "square" if fill >= _FILL_SQUARE else "circle" if fill >= _FILL_CIRCLE else "triangle"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def _check_edit(expected: Mapping[str, str]) -> None:
    sizes = ("large", "small")
    valid = expected.get("shape") in SHAPES and (
        expected.get("attribute") == "colour" and expected.get("value") in COLOURS
        or expected.get("attribute") == "size" and expected.get("value") in sizes)
    if not valid:
        raise ValueError(f"expected edit must be {{'shape': one of {list(SHAPES)}, 'attribute': 'colour' | 'size', "
                         f"'value': one of {list(COLOURS)} | one of {list(sizes)}}}, got {dict(expected)!r}")


def _rest_kept(labels_in: np.ndarray, labels_out: np.ndarray, edited: np.ndarray, threshold: float) -> bool:
    """Whether, away from the edited pixels and from the input's object edges, at least ``threshold`` of the
    background pixels and of the other objects' pixels keep their colour label."""
    foreground = labels_in >= 0
    edges = ndimage.binary_dilation(foreground) & ~ndimage.binary_erosion(foreground)  # ambiguous after resizing
    outside = ~ndimage.binary_dilation(edited, iterations=2) & ~edges
    same = labels_in == labels_out
    return all(same[region].mean() >= threshold
               for region in (outside & ~foreground, outside & foreground) if region.any())


def edit_correct(source: Image.Image | np.ndarray, edited: Image.Image | np.ndarray, expected: Mapping[str, str],
                 iou_threshold: float = 0.7, size_ratio: float = 1.4, keep_threshold: float = 0.9,
                 min_pixels: int = 4) -> bool:
    """Whether ``edited`` makes the requested edit of ``source`` and keeps the rest.

    The edited object is the largest blob of the source whose :func:`shape_class` is ``expected["shape"]``; its
    counterpart is the blob of the edited image that overlaps it most and must be of the same kind. A colour edit
    needs the counterpart in the new colour with mask IoU >= ``iou_threshold``; a size edit needs its area grown
    (``"large"``) or shrunk (``"small"``) by ``size_ratio``, the same colour, and a centre within 10% of the side.
    Outside both masks (grown by 2 px) and away from the source's object edges, at least ``keep_threshold`` of the
    background pixels and of the other objects' pixels keep their colour label.

    Args:
        source, edited: RGB images; the edited image is resized to the source's size if it differs.
        expected: ``{"shape": kind, "attribute": "colour" | "size", "value": colour name | "large" | "small"}`` (the
            ``edit`` field of ``edit.jsonl``).
    Returns:
        True when the edit is right.
    """
    _check_edit(expected)
    before, after = _array(source), _array(edited)
    if after.shape != before.shape:
        after = _array(Image.fromarray(to_uint8(after)).resize((before.shape[1], before.shape[0]), Image.BILINEAR))
    labels_in, labels_out = colour_labels(before), colour_labels(after)
    candidates = [b for b in _blobs(labels_in, min_pixels) if shape_class(b[0]) == expected["shape"]]
    if not candidates:
        return False
    old_mask, old_colour = candidates[0]
    overlapping = [b for b in _blobs(labels_out, min_pixels) if (b[0] & old_mask).any()]
    if not overlapping:
        return False
    new_mask, new_colour = max(overlapping, key=lambda b: (b[0] & old_mask).sum())
    if shape_class(new_mask) != expected["shape"]:
        return False
    if expected["attribute"] == "colour":
        changed = list(COLOURS)[new_colour] == expected["value"] and _iou(old_mask, new_mask) >= iou_threshold
    else:
        ratio = new_mask.sum() / old_mask.sum()
        grown = ratio >= size_ratio if expected["value"] == "large" else ratio <= 1 / size_ratio
        shift = np.hypot(*(np.argwhere(new_mask).mean(0) - np.argwhere(old_mask).mean(0)))
        changed = grown and new_colour == old_colour and shift <= 0.1 * max(before.shape[:2])
    return bool(changed and _rest_kept(labels_in, labels_out, old_mask | new_mask, keep_threshold))
