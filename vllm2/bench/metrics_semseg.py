"""Semantic segmentation metrics (mmsegmentation's definitions): per-class IoU accumulated over the dataset, mIoU,
aAcc (pixel accuracy) and mAcc; and the label map painted from per-category masks.

Pixels labelled ``ignore_index`` (255) count nowhere. Per class ``c``, over the whole run: ``inter`` = pixels
labelled ``c`` and predicted ``c``, ``union`` = labelled or predicted ``c``; ``IoU_c = inter / union``. ``mIoU`` is the
mean over the classes with a non-zero union (a class absent from both ground truth and prediction is left out, as
mmsegmentation's NaN mean does); ``aAcc`` = correctly predicted pixels / labelled pixels; ``mAcc`` the mean per-class
accuracy ``inter / labelled`` over the classes that occur in the ground truth. With ``reduce_zero_label`` pixels
labelled 0 are ignored too and class 0 is left out of every metric (ADE20K's protocol: 0 is "other").
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .metrics_ground import to_numpy

__all__ = ["IGNORE_INDEX", "label_map_from_masks", "semseg_counts", "semseg_metrics"]

IGNORE_INDEX = 255


def semseg_counts(
    pred: Any, label: Any, num_classes: int, ignore_index: int = IGNORE_INDEX, reduce_zero_label: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class pixel counts of one image (mmsegmentation's ``intersect_and_union``).

    Args:
        pred: ``[H, W]`` predicted class indices in ``[0, num_classes)``.
        label: ``[H, W]`` ground-truth class indices, or ``ignore_index``.
        num_classes: the number of classes.
        ignore_index: the label value that is not scored.
        reduce_zero_label: ignore pixels labelled 0 and leave class 0 out (its counts are 0).
    Returns:
        ``inter``, ``pred_area`` and ``label_area``, each ``[num_classes]`` int64.
    """
    pred, label = to_numpy(pred).astype(np.int64), to_numpy(label).astype(np.int64)
    if pred.shape != label.shape:
        raise ValueError(f"predicted label map is {pred.shape} but the ground truth is {label.shape}")
    valid = label != ignore_index  # [H, W]
    if reduce_zero_label:
        valid &= label != 0
    pred, label = pred[valid], label[valid]  # [P]
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted class {int(pred.max())} is outside 0..{num_classes - 1}")
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"label value {int(label.max())} is outside 0..{num_classes - 1} (and not {ignore_index})")
    inter = np.bincount(label[pred == label], minlength=num_classes)  # [K]
    pred_area = np.bincount(pred, minlength=num_classes)  # [K]
    label_area = np.bincount(label, minlength=num_classes)  # [K]
    if reduce_zero_label:
        pred_area[0] = 0
    return inter, pred_area, label_area


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den`` is 0."""
    return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _named(values: np.ndarray, names: Sequence[str]) -> dict[str, float | None]:
    return {name: None if np.isnan(v) else float(v) for name, v in zip(names, values)}


def semseg_metrics(
    inters: Sequence[Sequence[int]],
    pred_areas: Sequence[Sequence[int]],
    label_areas: Sequence[Sequence[int]],
    names: Sequence[str],
) -> dict[str, Any]:
    """mIoU, aAcc, mAcc and per-class IoU / accuracy from per-image counts (:func:`semseg_counts`).

    Args:
        inters, pred_areas, label_areas: per image, ``[K]`` counts.
        names: the ``K`` class names.
    Returns:
        ``mIoU``, ``aAcc``, ``mAcc`` (fractions; 0.0 when nothing is scored), ``IoU`` and ``Acc`` (class name ->
        value, None for a class with an empty union / no labelled pixel), ``scored_classes`` (classes in the mIoU).
    """
    k = len(names)
    inter = np.asarray(inters, dtype=np.float64).reshape(-1, k).sum(0)  # [K]
    pred_area = np.asarray(pred_areas, dtype=np.float64).reshape(-1, k).sum(0)  # [K]
    label_area = np.asarray(label_areas, dtype=np.float64).reshape(-1, k).sum(0)  # [K]
    iou = _ratio(inter, pred_area + label_area - inter)  # [K]
    acc = _ratio(inter, label_area)  # [K]
    scored = ~np.isnan(iou)
    return {
        "mIoU": float(iou[scored].mean()) if scored.any() else 0.0,
        "aAcc": float(inter.sum() / label_area.sum()) if label_area.sum() else 0.0,
        "mAcc": float(np.nanmean(acc)) if (~np.isnan(acc)).any() else 0.0,
        "IoU": _named(iou, names),
        "Acc": _named(acc, names),
        "scored_classes": int(scored.sum()),
    }


def label_map_from_masks(
    masks: Any, scores: Any, classes: Sequence[int | None], shape: tuple[int, int], background: int = 0
) -> np.ndarray:
    """Paint per-category masks into one label map: where masks overlap the higher score wins; pixels no mask
    covers are ``background``.

    Args:
        masks: ``[n, H, W]`` bool.
        scores: ``[n]``.
        classes: the class index of each mask (None: a mask of no known class, left out).
        shape: ``(H, W)`` of the map.
        background: the class of uncovered pixels.
    Returns:
        ``[H, W]`` int64 class indices.
    """
    masks, scores = to_numpy(masks).astype(bool), to_numpy(scores).astype(np.float64).reshape(-1)
    if len(masks) != len(scores) or len(scores) != len(classes):
        raise ValueError(f"{len(masks)} masks, {len(scores)} scores and {len(classes)} classes")
    if len(masks) and masks.shape[1:] != tuple(shape):
        raise ValueError(f"predicted masks are {masks.shape[1:]} but the image is {tuple(shape)}")
    out = np.full(shape, background, dtype=np.int64)  # [H, W]
    for i in np.argsort(scores, kind="stable"):  # ascending: the best mask is painted last
        if classes[i] is not None:
            out[masks[i]] = classes[i]
    return out
