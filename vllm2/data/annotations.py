"""Annotation geometry: boxes, COCO segmentations (polygons and RLE through pycocotools), region prompts, names.

Every function raises ``ValueError`` with a message naming the offending field; readers prefix it with the file and
record index.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from ..region import box_to_mask, point_to_mask

__all__ = [
    "require",
    "xywh_to_xyxy",
    "xyxy_box",
    "decode_segmentation",
    "mask_to_box",
    "region_to_mask",
    "clean_name",
    "boxes_array",
    "REGION_KEYS",
]

REGION_KEYS = ("box", "bbox", "polygon", "mask", "point")


def require(record: Any, key: str, types: type | tuple[type, ...], what: str = "record") -> Any:
    """``record[key]``, checked to exist and to be of ``types``.

    Args:
        record: a dict.
        key: the field name.
        types: accepted types.
        what: how to name ``record`` in the message.
    Returns:
        The value.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"{what} must be a JSON object, got {type(record).__name__}")
    if key not in record:
        raise ValueError(f"{what} has no field {key!r}")
    value = record[key]
    if not isinstance(value, types) or isinstance(value, bool) and bool not in _as_tuple(types):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise ValueError(f"{what} field {key!r} must be {names}, got {type(value).__name__}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _numbers(values: Any, count: int, field: str) -> list[float]:
    if not isinstance(values, (list, tuple)) or len(values) != count:
        raise ValueError(f"field {field!r} must be a list of {count} numbers, got {values!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"field {field!r} must hold finite numbers, got {values!r}")
    return [float(v) for v in values]


def xywh_to_xyxy(bbox: Any, field: str = "bbox") -> np.ndarray:
    """A COCO ``[x, y, w, h]`` box as ``[x1, y1, x2, y2]`` float32 (``w, h >= 0``)."""
    x, y, w, h = _numbers(bbox, 4, field)
    if w < 0 or h < 0:
        raise ValueError(f"field {field!r} has a negative width or height: {bbox!r}")
    return np.array([x, y, x + w, y + h], dtype=np.float32)


def xyxy_box(box: Any, field: str = "box") -> np.ndarray:
    """An ``[x1, y1, x2, y2]`` box as float32, checked to have ``x2 > x1`` and ``y2 > y1``."""
    x1, y1, x2, y2 = _numbers(box, 4, field)
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"field {field!r} must satisfy x2 > x1 and y2 > y1, got {box!r}")
    return np.array([x1, y1, x2, y2], dtype=np.float32)


def decode_segmentation(segmentation: Any, height: int, width: int, field: str = "segmentation") -> np.ndarray:
    """Decode a COCO segmentation (polygon list, uncompressed RLE or compressed RLE) to a bool ``[H, W]`` mask.

    Args:
        segmentation: ``[[x1, y1, x2, y2, ...], ...]`` polygons, or ``{"size": [h, w], "counts": list | str}``.
        height, width: the image size; an RLE of another size is an error.
        field: field name for messages.
    Returns:
        The mask.
    """
    if isinstance(segmentation, list):
        if not segmentation or not all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
            for p in segmentation
        ):
            raise ValueError(f"field {field!r}: polygons must be lists of at least 3 (x, y) pairs")
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, Mapping):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if list(size or []) != [height, width]:
            raise ValueError(f"field {field!r}: RLE size {size!r} differs from the image size [{height}, {width}]")
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects(dict(segmentation), height, width)
        elif isinstance(counts, (str, bytes)):
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
        else:
            raise ValueError(f"field {field!r}: RLE counts must be a list or a string")
    else:
        raise ValueError(f"field {field!r} must be polygons or an RLE dict, got {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """The tight xyxy box (pixel edges) of a non-empty bool mask."""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        raise ValueError("mask is empty")
    r1, r2 = np.flatnonzero(rows)[[0, -1]]
    c1, c2 = np.flatnonzero(cols)[[0, -1]]
    return np.array([c1, r1, c2 + 1, r2 + 1], dtype=np.float32)


def region_to_mask(spec: Any, width: int, height: int, field: str = "region") -> np.ndarray:
    """Rasterise a region prompt to a bool ``[H, W]`` mask.

    A region is a JSON object with exactly one of: ``box`` ``[x1, y1, x2, y2]``, ``bbox`` ``[x, y, w, h]`` (COCO),
    ``polygon`` (COCO polygons), ``mask`` (COCO RLE), ``point`` ``[x, y]`` (a small disc).

    Args:
        spec: the region object.
        width, height: the image size.
        field: field name for messages.
    Returns:
        The mask (never empty).
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"{field} must be a JSON object with one of {list(REGION_KEYS)}")
    keys = [k for k in REGION_KEYS if k in spec]
    if len(keys) != 1:
        raise ValueError(f"{field} must have exactly one of {list(REGION_KEYS)}, got keys {sorted(spec)}")
    key, value = keys[0], spec[keys[0]]
    where = f"{field}.{key}"
    if key == "box":
        mask = box_to_mask(tuple(xyxy_box(value, where)), width, height)
    elif key == "bbox":
        box = xywh_to_xyxy(value, where)
        mask = box_to_mask(tuple(xyxy_box(box.tolist(), where)), width, height)
    elif key == "point":
        mask = point_to_mask(tuple(_numbers(value, 2, where)), width, height)
    else:
        mask = decode_segmentation(value, height, width, where)
    if not mask.any():
        raise ValueError(f"{where} covers no pixel of the {width}x{height} image")
    return mask


def clean_name(name: Any, field: str = "name") -> str:
    """A category or keypoint name as prompt text: underscores to spaces, whitespace collapsed."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"field {field!r} must be a non-empty string, got {name!r}")
    return " ".join(name.replace("_", " ").split())


def boxes_array(boxes: Sequence[np.ndarray]) -> np.ndarray:
    """Stack xyxy boxes into ``[N, 4]`` float32 (``[0, 4]`` when empty)."""
    return np.stack(boxes).astype(np.float32) if len(boxes) else np.zeros((0, 4), dtype=np.float32)
