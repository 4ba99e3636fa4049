"""COCO-style AP for detection, instance segmentation and keypoints, computed by pycocotools' ``COCOeval``.

Predictions come from the decoders as per-sample dicts in original image pixels (``boxes`` xyxy, ``scores``,
``labels``, optional ``masks`` / ``keypoints``). A label is the index of its query group, i.e. the position of the
category in the prompt; ``category_ids[label]`` maps it back to the dataset's category id (``None`` drops it, e.g. a
phrase the model wrote that names no dataset category).
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .metrics_ground import to_numpy

__all__ = [
    "BOX_STATS",
    "COCO_KEYPOINT_NAMES",
    "COCO_KEYPOINT_SIGMAS",
    "KEYPOINT_STATS",
    "UNIFORM_KEYPOINT_SIGMA",
    "coco_eval",
    "coco_gt_from_targets",
    "detections_to_coco",
    "encode_masks",
    "keypoint_sigmas",
    "keypoints_to_coco",
    "load_coco",
]

logger = logging.getLogger(__name__)

BOX_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
KEYPOINT_STATS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")

COCO_KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)
# Per-keypoint OKS falloff of the COCO person skeleton (pycocotools' defaults), in COCO_KEYPOINT_NAMES order.
COCO_KEYPOINT_SIGMAS = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089,
    0.089,
)
# Used for skeletons without known sigmas: the mean of the COCO sigmas.
UNIFORM_KEYPOINT_SIGMA = float(np.mean(COCO_KEYPOINT_SIGMAS))


@contextlib.contextmanager
def _quiet():
    """Capture pycocotools' prints and send them to the debug log."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if buffer.getvalue().strip():
        logger.debug("pycocotools: %s", buffer.getvalue().strip())


def load_coco(gt: str | Mapping[str, Any] | COCO) -> COCO:
    """A pycocotools ``COCO`` from an annotation file path, a COCO-format dict or an existing ``COCO``."""
    if isinstance(gt, COCO):
        return gt
    with _quiet():
        if isinstance(gt, str):
            return COCO(gt)
        coco = COCO()
        coco.dataset = dict(gt)
        coco.createIndex()
    return coco


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """Compressed RLEs (JSON-friendly ``counts`` strings) of bool masks ``[n, H, W]``."""
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))  # [H, W, n] in
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    out = boxes.astype(np.float64).copy()  # [n, 4]
    out[:, 2:] -= out[:, :2]
    return out


def _mapped(labels: np.ndarray, category_ids: Sequence[int | None]) -> tuple[np.ndarray, list[int]]:
    """Indices of the predictions whose label maps to a dataset category, and those category ids."""
    keep, cats = [], []
    for i, label in enumerate(labels.tolist()):
        cat = category_ids[label] if 0 <= label < len(category_ids) else None
        if cat is not None:
            keep.append(i)
            cats.append(int(cat))
    dropped = len(labels) - len(keep)
    if dropped:
        logger.debug("dropped %d predictions whose label has no dataset category", dropped)
    return np.asarray(keep, dtype=np.int64), cats


def detections_to_coco(
    image_id: int, pred: Mapping[str, Any], category_ids: Sequence[int | None], with_masks: bool = False
) -> list[dict[str, Any]]:
    """One image's detections as COCO result records.

    Args:
        image_id: the dataset image id.
        pred: ``boxes`` [n, 4] xyxy pixels, ``scores`` [n], ``labels`` [n] (group index), optional ``masks`` [n, H, W].
        category_ids: dataset category id of each prompt category, in prompt order (``None``: drop).
        with_masks: also write the RLE ``segmentation`` (needs ``masks``).
    Returns:
        Records with ``image_id``, ``category_id``, ``bbox`` (xywh), ``score`` and optionally ``segmentation``.
    """
    keep, cats = _mapped(to_numpy(pred["labels"]).reshape(-1).astype(np.int64), category_ids)
    boxes = _xyxy_to_xywh(to_numpy(pred["boxes"]).reshape(-1, 4)[keep])  # [n, 4]
    scores = to_numpy(pred["scores"]).reshape(-1)[keep].astype(np.float64)  # [n]
    records = [{"image_id": int(image_id), "category_id": cat, "bbox": box.tolist(), "score": float(score)}
               for cat, box, score in zip(cats, boxes, scores)]
    if with_masks and records:
        if pred.get("masks") is None:
            raise ValueError("segmentation results need 'masks' in the prediction")
        for record, rle in zip(records, encode_masks(to_numpy(pred["masks"]).astype(bool)[keep])):
            record["segmentation"] = rle
    return records


def keypoints_to_coco(image_id: int, pred: Mapping[str, Any], category_ids: Sequence[int | None]) -> list[dict]:
    """One image's pose instances as COCO keypoint result records.

    Args:
        image_id: the dataset image id.
        pred: ``keypoints`` [n, Kp, 3] (x, y, visibility score) pixels, ``scores`` [n], ``labels`` [n] (group index).
        category_ids: dataset category id of each prompt category, in prompt order (``None``: drop).
    Returns:
        Records with ``image_id``, ``category_id``, ``keypoints`` (flat x, y, v) and ``score``.
    """
    keep, cats = _mapped(to_numpy(pred["labels"]).reshape(-1).astype(np.int64), category_ids)
    keypoints = to_numpy(pred["keypoints"]).astype(np.float64)
    keypoints = keypoints.reshape(len(keypoints), -1, 3)[keep]  # [n, Kp, 3]
    scores = to_numpy(pred["scores"]).reshape(-1)[keep].astype(np.float64)  # [n]
    return [{"image_id": int(image_id), "category_id": cat, "keypoints": kpts.reshape(-1).tolist(),
             "score": float(score)} for cat, kpts, score in zip(cats, keypoints, scores)]


def keypoint_sigmas(
    num_keypoints: int, names: Sequence[str] | None = None, sigmas: Sequence[float] | None = None
) -> np.ndarray:
    """OKS sigmas for a skeleton.

    Explicit ``sigmas`` win; then the COCO person sigmas when the skeleton is COCO's (names equal to
    :data:`COCO_KEYPOINT_NAMES`, spaces or underscores, or 17 keypoints without names); otherwise
    :data:`UNIFORM_KEYPOINT_SIGMA` for every keypoint.

    Returns:
        ``[num_keypoints]`` float array.
    """
    if sigmas is not None:
        if len(sigmas) != num_keypoints:
            raise ValueError(f"keypoint sigmas: {len(sigmas)} values for {num_keypoints} keypoints")
        return np.asarray(sigmas, dtype=np.float64)
    is_coco = (tuple(n.strip().lower().replace(" ", "_") for n in names) == COCO_KEYPOINT_NAMES if names
               else num_keypoints == len(COCO_KEYPOINT_SIGMAS))
    if is_coco:
        return np.asarray(COCO_KEYPOINT_SIGMAS, dtype=np.float64)
    return np.full(num_keypoints, UNIFORM_KEYPOINT_SIGMA)


def coco_eval(
    gt: str | Mapping[str, Any] | COCO,
    results: Sequence[Mapping[str, Any]],
    iou_type: str = "bbox",
    image_ids: Sequence[int] | None = None,
    sigmas: Sequence[float] | None = None,
) -> dict[str, float]:
    """COCO AP / AR by pycocotools.

    Args:
        gt: the ground truth (annotation file, COCO-format dict, or ``COCO``).
        results: COCO result records (see :func:`detections_to_coco`, :func:`keypoints_to_coco`).
        iou_type: ``"bbox"``, ``"segm"`` or ``"keypoints"``.
        image_ids: evaluate only these images (e.g. the ones a limited run saw); default all.
        sigmas: OKS sigmas for ``"keypoints"``; default :func:`keypoint_sigmas` of the GT skeleton.
    Returns:
        ``AP``, ``AP50``, ``AP75``, ... as fractions (``BOX_STATS`` or ``KEYPOINT_STATS`` names); -1 where the
        ground truth has nothing to measure. No results at all score 0 wherever there is ground truth.
    """
    if iou_type not in ("bbox", "segm", "keypoints"):
        raise ValueError(f"iou_type must be 'bbox', 'segm' or 'keypoints', got {iou_type!r}")
    coco_gt = load_coco(gt)
    names = KEYPOINT_STATS if iou_type == "keypoints" else BOX_STATS
    ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted(int(i) for i in image_ids)
    with _quiet():
        coco_dt = coco_gt.loadRes([dict(r) for r in results]) if results else _no_detections(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = ids
        if iou_type == "keypoints":
            evaluator.params.kpt_oks_sigmas = _gt_sigmas(coco_gt, sigmas)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(names, evaluator.stats)}


def _no_detections(coco_gt: COCO) -> COCO:
    """An empty result set (pycocotools' ``loadRes`` refuses an empty list)."""
    coco_dt = COCO()
    coco_dt.dataset = {"images": coco_gt.dataset.get("images", []), "categories": coco_gt.dataset.get("categories", []),
                       "annotations": []}
    coco_dt.createIndex()
    return coco_dt


def _gt_sigmas(coco_gt: COCO, sigmas: Sequence[float] | None) -> np.ndarray:
    """OKS sigmas for the GT's skeleton (the first category that declares ``keypoints``)."""
    declared = [c.get("keypoints") for c in coco_gt.loadCats(coco_gt.getCatIds()) if c.get("keypoints")]
    if declared:
        return keypoint_sigmas(len(declared[0]), declared[0], sigmas)
    anns = coco_gt.loadAnns(coco_gt.getAnnIds())
    if not anns or "keypoints" not in anns[0]:
        raise ValueError("keypoint evaluation needs 'keypoints' in the ground-truth annotations")
    return keypoint_sigmas(len(anns[0]["keypoints"]) // 3, None, sigmas)


def coco_gt_from_targets(
    images: Sequence[tuple[int, int, int]],
    targets: Sequence[Mapping[str, Any]],
    categories: Sequence[Mapping[str, Any]],
    category_ids: Sequence[Sequence[int]],
) -> dict[str, Any]:
    """A COCO-format ground truth built from raw task targets (for datasets without a COCO annotation file).

    Args:
        images: ``(image_id, width, height)`` per sample.
        targets: per sample ``boxes`` [N, 4] xyxy, ``labels`` [N] (group index), optional ``masks`` [N, H, W] and
            ``keypoints`` [N, Kp, 3].
        categories: the dataset's COCO ``categories`` records (``id``, ``name``, optional ``keypoints``).
        category_ids: per sample, the dataset category id of each prompt category.
    Returns:
        A COCO dataset dict (``images``, ``annotations``, ``categories``); ``area`` is the mask area when masks are
        given, else the box area; ``iscrowd`` 0.
    """
    if not (len(images) == len(targets) == len(category_ids)):
        raise ValueError(f"{len(images)} images, {len(targets)} targets, {len(category_ids)} category lists")
    annotations: list[dict[str, Any]] = []
    for (image_id, _, _), target, cats in zip(images, targets, category_ids):
        labels = to_numpy(target["labels"]).reshape(-1).astype(np.int64)
        boxes = _xyxy_to_xywh(to_numpy(target["boxes"]).reshape(-1, 4))  # [N, 4]
        masks = to_numpy(target["masks"]).astype(bool) if target.get("masks") is not None else None
        rles = encode_masks(masks) if masks is not None and len(masks) else [None] * len(labels)
        keypoints = to_numpy(target["keypoints"]) if target.get("keypoints") is not None else None
        for i, (label, box, rle) in enumerate(zip(labels.tolist(), boxes, rles)):
            ann = {"id": len(annotations) + 1, "image_id": int(image_id), "category_id": int(cats[label]),
                   "bbox": box.tolist(), "iscrowd": 0,
                   "area": float(mask_utils.area(rle)) if rle is not None else float(box[2] * box[3])}
            if rle is not None:
                ann["segmentation"] = rle
            if keypoints is not None:
                kpts = keypoints[i].astype(np.float64)  # [Kp, 3]
                ann["keypoints"] = kpts.reshape(-1).tolist()
                ann["num_keypoints"] = int((kpts[:, 2] > 0).sum())
            annotations.append(ann)
    return {"images": [{"id": int(i), "width": int(w), "height": int(h)} for i, w, h in images],
            "annotations": annotations, "categories": [dict(c) for c in categories]}
