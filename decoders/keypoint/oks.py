"""Object keypoint similarity (OKS), computed exactly as pycocotools' ``COCOeval.computeOks``, and OKS sigmas."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["COCO_SIGMAS", "keypoint_oks", "oks_sigmas"]

COCO_SIGMAS: tuple[float, ...] = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089,
    0.089,
)
_EPS = 2.220446049250313e-16  # numpy.spacing(1), as in pycocotools


def oks_sigmas(
    num_keypoints: int,
    dataset: str | None = None,
    per_dataset: Mapping[str, Sequence[float]] | None = None,
    uniform_sigma: float = 0.05,
) -> torch.Tensor:
    """Per-keypoint OKS sigmas of one skeleton.

    Args:
        num_keypoints: number of keypoints of the skeleton.
        dataset: dataset name, looked up in ``per_dataset`` first.
        per_dataset: dataset name -> sigmas (from the decoder config).
        uniform_sigma: sigma of every keypoint of an unknown skeleton other than COCO's 17 keypoints.
    Returns:
        ``[num_keypoints]`` float tensor.
    """
    if dataset is not None and per_dataset and dataset in per_dataset:
        sigmas = per_dataset[dataset]
        if len(sigmas) != num_keypoints:
            raise ValueError(
                f"keypoint.oks_sigmas[{dataset!r}] has {len(sigmas)} sigmas but the target has {num_keypoints} "
                "keypoints"
            )
        return torch.tensor(list(sigmas), dtype=torch.float32)
    if num_keypoints == len(COCO_SIGMAS):
        return torch.tensor(COCO_SIGMAS, dtype=torch.float32)
    return torch.full((num_keypoints,), float(uniform_sigma))


def keypoint_oks(
    pred_xy: torch.Tensor,
    gt_keypoints: torch.Tensor,
    areas: torch.Tensor,
    sigmas: torch.Tensor,
    gt_boxes: torch.Tensor,
    keypoint_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """OKS between predicted and ground-truth keypoints, broadcasting over leading dimensions.

    Follows ``COCOeval.computeOks``: with at least one labelled (v > 0) ground-truth keypoint, the similarity averages
    ``exp(-d^2 / (2 * area * (2 sigma)^2))`` over labelled keypoints; without any, distances are measured to the
    ground-truth box enlarged by its size on each side and averaged over all keypoints. Use
    ``pred_xy[:, :, None]`` and ``gt_keypoints[:, None]`` for a pairwise ``[D, G]`` matrix.

    Args:
        pred_xy: ``[..., Kp, 2]`` predicted (x, y).
        gt_keypoints: ``[..., Kp, 3]`` ground-truth (x, y, v), same units as ``pred_xy``.
        areas: ``[...]`` ground-truth object areas (units squared).
        sigmas: ``[..., Kp]`` (or ``[Kp]``) per-keypoint sigmas.
        gt_boxes: ``[..., 4]`` ground-truth boxes as COCO (x, y, w, h).
        keypoint_mask: optional ``[..., Kp]`` bool, False on padded keypoint slots.
    Returns:
        ``[...]`` OKS in [0, 1].
    """
    variances = (2 * sigmas) ** 2  # [..., Kp]
    gt_xy, vis = gt_keypoints[..., :2], gt_keypoints[..., 2] > 0  # [..., Kp, 2], [..., Kp]
    valid = torch.ones_like(vis) if keypoint_mask is None else keypoint_mask.expand_as(vis)  # [..., Kp]
    vis = vis & valid
    labelled = vis.any(-1, keepdim=True)  # [..., 1]

    box_xy, box_wh = gt_boxes[..., None, :2], gt_boxes[..., None, 2:]  # [..., 1, 2]
    low, high = box_xy - box_wh, box_xy + 2 * box_wh  # [..., 1, 2]
    outside = (low - pred_xy).clamp(min=0) + (pred_xy - high).clamp(min=0)  # [..., Kp, 2]
    delta = torch.where(labelled[..., None], pred_xy - gt_xy, outside)  # [..., Kp, 2]

    e = delta.pow(2).sum(-1) / variances / (areas[..., None] + _EPS) / 2  # [..., Kp]
    counted = torch.where(labelled, vis, valid)  # [..., Kp]
    total = torch.where(counted, torch.exp(-e), torch.zeros_like(e)).sum(-1)  # [...]
    return total / counted.sum(-1).clamp(min=1)
