"""Per-task benchmarks: metric functions (pure) and the runner behind ``vllm2 bench``.

Metric modules:
- :mod:`.metrics_coco`: COCO bbox / segm / keypoint AP by pycocotools, label -> category mapping, OKS sigmas.
- :mod:`.metrics_ground`: REC Acc@0.5, RES cIoU / mIoU, PCK.
- :mod:`.metrics_semseg`: semantic segmentation mIoU, aAcc, mAcc, per-class IoU (mmsegmentation's definitions).
- :mod:`.metrics_text`: VQA accuracy, CIDEr-D, BLEU.
- :mod:`.metrics_clip`: CLIP score, CLIP-I / CLIP-T / directional similarity on open_clip.

Running: :mod:`.tasks` (per-task reader, routes, scoring, aggregation), :mod:`.runner` (routed / teacher-forced
predictors, batching, sharding and merging, weight hashes), :mod:`.readers` (VQA and caption files, semantic
segmentation folders in the ADE20K layout).
"""

from .metrics_clip import (
    ClipScorer,
    clip_directional_similarity,
    clip_image_similarity,
    clip_score,
    clip_text_similarity,
    edit_metrics,
    load_clip_scorer,
)
from .metrics_coco import coco_eval, coco_gt_from_targets, detections_to_coco, keypoint_sigmas, keypoints_to_coco
from .metrics_ground import aligned_box_iou, match_instances, pck, rec_accuracy, res_iou, top1
from .metrics_semseg import label_map_from_masks, semseg_counts, semseg_metrics
from .metrics_text import bleu, caption_metrics, cider_d, normalize_vqa_answer, vqa_accuracy, vqa_score
from .runner import evaluate, evaluate_sharded, routed_predictor, teacher_forced_predictor
from .tasks import TASKS, BenchTask, DecoderPrediction, SamplePrediction, TaskOptions, build_task

__all__ = [
    "TASKS",
    "BenchTask",
    "ClipScorer",
    "DecoderPrediction",
    "SamplePrediction",
    "TaskOptions",
    "build_task",
    "evaluate",
    "evaluate_sharded",
    "routed_predictor",
    "teacher_forced_predictor",
    "aligned_box_iou",
    "bleu",
    "caption_metrics",
    "cider_d",
    "clip_directional_similarity",
    "clip_image_similarity",
    "clip_score",
    "clip_text_similarity",
    "coco_eval",
    "coco_gt_from_targets",
    "detections_to_coco",
    "edit_metrics",
    "keypoint_sigmas",
    "keypoints_to_coco",
    "label_map_from_masks",
    "load_clip_scorer",
    "match_instances",
    "normalize_vqa_answer",
    "pck",
    "rec_accuracy",
    "res_iou",
    "semseg_counts",
    "semseg_metrics",
    "top1",
    "vqa_accuracy",
    "vqa_score",
]
