"""Grounding and single-instance metrics: REC Acc@0.5, RES cIoU / mIoU, keypoint PCK.

A missing prediction (``None``: no route, decoder error, no instance) counts as a miss everywhere.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["aligned_box_iou", "iou_summary", "mask_counts", "pck", "rec_accuracy", "res_iou", "to_numpy", "top1"]


def to_numpy(value: Any) -> np.ndarray:
    """A tensor (detached, on the CPU), array or list as a numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def top1(pred: Mapping[str, Any] | None, key: str) -> np.ndarray | None:
    """The ``key`` entry (``boxes``, ``masks``, ``keypoints``) of the highest-scoring instance, or None when empty."""
    if pred is None or pred.get(key) is None or len(pred["scores"]) == 0:
        return None
    best = int(to_numpy(pred["scores"]).reshape(-1).argmax())
    return to_numpy(pred[key])[best]


def aligned_box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of paired xyxy boxes ``a[i]``, ``b[i]`` (continuous coordinates).

    Args:
        a, b: ``[N, 4]`` boxes.
    Returns:
        ``[N]`` IoUs (0 where the union is empty).
    """
    lt = np.maximum(a[:, :2], b[:, :2])  # [N, 2]
    rb = np.minimum(a[:, 2:], b[:, 2:])  # [N, 2]
    inter = np.clip(rb - lt, 0, None).prod(1)  # [N]
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(1)  # [N]
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(1)  # [N]
    union = area_a + area_b - inter  # [N]
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_instances(pred_boxes: Any, pred_scores: Any, gt_boxes: Any) -> list[int | None]:
    """Match predicted instances to ground-truth instances: in descending score order, each prediction takes the
    unmatched ground-truth instance its box overlaps most (IoU > 0).

    Args:
        pred_boxes: ``[n, 4]`` xyxy; pred_scores: ``[n]``; gt_boxes: ``[m, 4]`` xyxy.
    Returns:
        Per ground-truth instance the index of its prediction, or None.
    """
    pred = to_numpy(pred_boxes).astype(np.float64).reshape(-1, 4)
    gt = to_numpy(gt_boxes).astype(np.float64).reshape(-1, 4)
    n, m = len(pred), len(gt)
    ious = aligned_box_iou(np.repeat(pred, m, 0), np.tile(gt, (n, 1))).reshape(n, m)  # [n, m]
    match: list[int | None] = [None] * m
    for i in np.argsort(-to_numpy(pred_scores).reshape(-1), kind="stable"):
        free = [j for j in range(m) if match[j] is None and ious[i, j] > 0]
        if free:
            match[max(free, key=lambda j: ious[i, j])] = int(i)
    return match


def rec_accuracy(pred_boxes: Sequence[Any | None], gt_boxes: Sequence[Any], threshold: float = 0.5) -> float:
    """Referring expression comprehension accuracy: share of expressions whose top-1 box has IoU >= ``threshold``.

    Args:
        pred_boxes: per expression the top-1 xyxy box ``[4]``, or None (miss).
        gt_boxes: per expression the ground-truth xyxy box ``[4]``.
    Returns:
        Accuracy in [0, 1].
    """
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"{len(pred_boxes)} predictions for {len(gt_boxes)} expressions")
    if not gt_boxes:
        return 0.0
    hit = np.array([p is not None for p in pred_boxes])
    pred = np.stack([to_numpy(p).reshape(4) if p is not None else np.zeros(4) for p in pred_boxes]).astype(np.float64)
    gt = np.stack([to_numpy(g).reshape(4) for g in gt_boxes]).astype(np.float64)  # [N, 4]
    return float(((aligned_box_iou(pred, gt) >= threshold) & hit).mean())


def mask_counts(pred: Any | None, gt: Any) -> tuple[int, int]:
    """Intersection and union pixel counts of one predicted mask (None: empty) and its ground truth ``[H, W]``."""
    gt = to_numpy(gt).astype(bool)
    pred = np.zeros_like(gt) if pred is None else to_numpy(pred).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"predicted mask {pred.shape} but ground truth {gt.shape}")
    return int((pred & gt).sum()), int((pred | gt).sum())


def iou_summary(inters: Sequence[int], unions: Sequence[int]) -> dict[str, float]:
    """``cIoU`` (sum of intersections / sum of unions) and ``mIoU`` (mean per-expression IoU; both masks empty
    scores 1) from per-expression pixel counts."""
    if not len(inters):
        return {"cIoU": 0.0, "mIoU": 0.0}
    inter, union = np.asarray(inters, dtype=np.float64), np.asarray(unions, dtype=np.float64)
    per = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return {"cIoU": float(inter.sum() / union.sum()) if union.sum() else 1.0, "mIoU": float(per.mean())}


def res_iou(pred_masks: Sequence[Any | None], gt_masks: Sequence[Any]) -> dict[str, float]:
    """Referring segmentation IoUs (see :func:`iou_summary`).

    Args:
        pred_masks: per expression a bool mask ``[H, W]`` or None (an empty prediction).
        gt_masks: per expression the bool ground-truth mask ``[H, W]``.
    Returns:
        ``{"cIoU": ..., "mIoU": ...}`` in [0, 1].
    """
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"{len(pred_masks)} predictions for {len(gt_masks)} expressions")
    counts = []
    for i, (pred, gt) in enumerate(zip(pred_masks, gt_masks)):
        try:
            counts.append(mask_counts(pred, gt))
        except ValueError as err:
            raise ValueError(f"expression {i}: {err}") from err
    return iou_summary([c[0] for c in counts], [c[1] for c in counts])


def pck(
    pred_keypoints: Sequence[Any | None], gt_keypoints: Sequence[Any], gt_boxes: Sequence[Any], alpha: float = 0.2
) -> float:
    """Percentage of correct keypoints, pooled over all visible ground-truth keypoints.

    A keypoint is correct when its distance to the ground truth is at most ``alpha * max(w, h)`` of the
    ground-truth instance's box. Only keypoints with visibility ``v > 0`` count.

    Args:
        pred_keypoints: per instance the top-1 predicted keypoints ``[Kp, 2 or 3]`` (pixels), or None (all wrong).
        gt_keypoints: per instance ``[Kp, 3]`` (x, y, v).
        gt_boxes: per instance the xyxy box ``[4]``.
        alpha: the threshold as a fraction of the box's longer side.
    Returns:
        PCK in [0, 1].
    """
    if not (len(pred_keypoints) == len(gt_keypoints) == len(gt_boxes)):
        raise ValueError(f"{len(pred_keypoints)} predictions, {len(gt_keypoints)} instances, {len(gt_boxes)} boxes")
    correct, total = 0, 0
    for pred, gt, box in zip(pred_keypoints, gt_keypoints, gt_boxes):
        gt = to_numpy(gt).astype(np.float64)  # [Kp, 3]
        box = to_numpy(box).astype(np.float64).reshape(4)
        visible = gt[:, 2] > 0  # [Kp]
        total += int(visible.sum())
        if pred is None:
            continue
        pred = to_numpy(pred).astype(np.float64)[:, :2]  # [Kp, 2]
        if pred.shape[0] != gt.shape[0]:
            raise ValueError(f"{pred.shape[0]} predicted keypoints for {gt.shape[0]} ground-truth keypoints")
        dist = np.linalg.norm(pred - gt[:, :2], axis=1)  # [Kp]
        correct += int(((dist <= alpha * max(box[2] - box[0], box[3] - box[1])) & visible).sum())
    return correct / total if total else 0.0
