"""Keypoint decoder behind ``[POSE]``: UniPose-style deformable DETR driven by super-link queries."""

from __future__ import annotations

from .config import KeypointDecoderConfig
from .criterion import LayerOutput, PoseCriterion, normalized_keypoint_oks
from .model import EncodedImages, KeypointDecoder, KeypointPredictions, KeypointQueries
from .oks import COCO_SIGMAS, keypoint_oks, oks_sigmas
from .postprocess import postprocess, to_coco_keypoints, to_coco_results

__all__ = [
    "COCO_SIGMAS",
    "EncodedImages",
    "KeypointDecoder",
    "KeypointDecoderConfig",
    "KeypointPredictions",
    "LayerOutput",
    "PoseCriterion",
    "KeypointQueries",
    "keypoint_oks",
    "normalized_keypoint_oks",
    "oks_sigmas",
    "postprocess",
    "to_coco_keypoints",
    "to_coco_results",
]
