"""Right or wrong: judge one chat answer against its ground truth with the benchmarks' own rules.

``vllm2 chat --batch`` judges every item that carries an ``expect`` object (see ``data/samples/demo.json``, written
by :func:`vllm2.shapes.write_demo`); ``expect["rule"]`` names the rule, one function each:

- ``describe``: the caption equals the ground-truth caption, both tokenised as ``vllm2 bench caption`` tokenises
  (:func:`~.metrics_text.caption_tokens`: lowercase words, punctuation dropped).
- ``count``: exact VQA match (:func:`~.metrics_text.vqa_score` with one reference answer: official normalisation,
  so "two" and "2" match).
- ``detect``: every ground-truth object is found by a predicted box scoring at least :data:`MIN_DETECTION_SCORE`
  with box IoU >= 0.5 whose group phrase names the object's category (:func:`~.tasks.normalize_name`).
- ``segment``: for each category present, the IoU of the predicted mask of that category with the union of its
  ground-truth masks is >= 0.5. The predicted mask is read from the decoder's ``semantic`` map (the pixels whose
  group names the category) or, without one, from its instance masks painted as ``vllm2 bench semseg`` paints them
  (:func:`~.metrics_semseg.label_map_from_masks`, masks scoring above ``TaskOptions.mask_score_threshold``).
- ``find``: the top-1 mask (or box when there is no mask) has IoU >= 0.5 with the referred shape
  (:func:`~.metrics_ground.top1`, :func:`~.metrics_ground.mask_counts`, :func:`~.metrics_ground.aligned_box_iou`).
- ``pose``: PCK@0.1 pooled over every keypoint of every figure is >= 0.5: predictions are matched to figures as
  ``vllm2 bench pose`` matches them (:func:`~.metrics_ground.match_instances`), keypoint groups are read by their
  phrases (:func:`~.tasks.routed_keypoints`) and a keypoint is right within 0.1 x the figure box's longer side
  (:func:`~.metrics_ground.pck`).
- ``draw``: :func:`~.image_judges.dominant_colour` and :func:`~.image_judges.shape_class` of the image are the
  caption's (``vllm2 bench gen --judge shapes``).
- ``edit``: :func:`~.image_judges.edit_correct` (``vllm2 bench edit --judge shapes``).

Outputs are found by decoder, as the benchmarks find them. A judge that cannot run (no output of the decoder, a
decoder error, a malformed result) says wrong with the reason; :func:`judge` never raises.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
from PIL import Image

from superlink import RouteTable

from ..data.annotations import decode_segmentation
from .image_judges import dominant_colour, edit_correct, shape_class
from .metrics_ground import aligned_box_iou, mask_counts, match_instances, pck, to_numpy, top1
from .metrics_semseg import label_map_from_masks
from .metrics_text import caption_tokens, vqa_score
from .runner import from_chat
from .tasks import DecoderPrediction, TaskOptions, normalize_name, routed_keypoints

if TYPE_CHECKING:
    from ..chat import ChatResult

logger = logging.getLogger(__name__)

__all__ = ["IOU_THRESHOLD", "MIN_DETECTION_SCORE", "PCK_ALPHA", "PCK_THRESHOLD", "RULES", "Verdict", "judge",
           "judge_count", "judge_describe", "judge_detect", "judge_draw", "judge_edit", "judge_find", "judge_pose",
           "judge_segment"]

IOU_THRESHOLD = 0.5  # detect, segment, find
MIN_DETECTION_SCORE = 0.3  # detections scoring less do not count (the demo pictures do not draw them either)
PCK_ALPHA, PCK_THRESHOLD = 0.1, 0.5  # pose: PCK@0.1 of all keypoints must reach 0.5


@dataclass(frozen=True)
class Verdict:
    """Whether an answer is right, and a short reason."""

    right: bool
    reason: str


def _decode(rle: Mapping[str, Any]) -> np.ndarray:
    """A COCO RLE of an ``expect`` field as a bool ``[H, W]`` mask."""
    return decode_segmentation(rle, *rle["size"], field="expect mask")


def _phrase(phrases: list[str] | None, label: int) -> str | None:
    """The normalised phrase of group ``label`` (None when the group has none)."""
    return normalize_name(phrases[label]) if phrases is not None and 0 <= label < len(phrases) else None


# ------------------------------------------------------------------------------------------------ text rules


def judge_describe(text: str, expect: Mapping[str, Any]) -> Verdict:
    """The caption equals ``expect["caption"]`` word for word (caption-bench tokens)."""
    truth = expect["caption"]
    if caption_tokens(text) == caption_tokens(truth):
        return Verdict(True, f"the caption is {truth!r}")
    return Verdict(False, f"the caption is {truth!r}, not {text!r}")


def judge_count(text: str, expect: Mapping[str, Any]) -> Verdict:
    """``text`` matches ``expect["answer"]`` exactly after VQA normalisation."""
    truth = expect["answer"]
    if vqa_score(text, [truth]) == 1.0:
        return Verdict(True, f"the answer is {truth!r}")
    return Verdict(False, f"the answer is {truth!r}, not {text!r}")


# ------------------------------------------------------------------------------------------------ decoder rules


def judge_detect(out: DecoderPrediction, expect: Mapping[str, Any]) -> Verdict:
    """Every ``expect["objects"]`` entry (``category``, xyxy ``box``, ``phrase``) is found by a box scoring at least
    :data:`MIN_DETECTION_SCORE` with IoU >= 0.5 and its category's phrase."""
    result = out.result
    scores = to_numpy(result["scores"]).astype(np.float64).reshape(-1)  # [n]
    keep = scores >= MIN_DETECTION_SCORE
    boxes = to_numpy(result["boxes"]).astype(np.float64).reshape(-1, 4)[keep]  # [k, 4]
    names = [_phrase(out.phrases, int(label)) for label in to_numpy(result["labels"]).reshape(-1)[keep]]
    missed = []
    for obj in expect["objects"]:
        gt = np.repeat(np.asarray(obj["box"], dtype=np.float64)[None], len(boxes), 0)  # [k, 4]
        ious = aligned_box_iou(boxes, gt) if len(boxes) else np.zeros(0)  # [k]
        if not any(iou >= IOU_THRESHOLD and name == normalize_name(obj["category"]) for iou, name in zip(ious, names)):
            missed.append(obj.get("phrase", obj["category"]))
    found = len(expect["objects"]) - len(missed)
    reason = (f"{found} of {len(expect['objects'])} objects found (box IoU >= {IOU_THRESHOLD}, right label, "
              f"score >= {MIN_DETECTION_SCORE}; {len(boxes)} boxes kept)")
    return Verdict(not missed, reason + (f"; missed: {', '.join(missed)}" if missed else ""))


def _category_masks(out: DecoderPrediction, shape: tuple[int, int]) -> Callable[[str], np.ndarray]:
    """A function from a category name to the predicted bool ``[H, W]`` mask of that category: the pixels of the
    ``semantic`` map whose group phrase names it, or (without a map) of the instance masks painted as ``vllm2 bench
    semseg`` paints them."""
    result = out.result
    if result.get("semantic") is not None:
        groups = to_numpy(result["semantic"]).astype(np.int64)  # [H, W] group index of each pixel
        if groups.shape != shape:
            raise ValueError(f"the semantic map is {groups.shape}, the image {shape}")
        names = [_phrase(out.phrases, g) for g in range(len(out.phrases or []))]
        return lambda name: np.isin(groups, [g for g, n in enumerate(names) if n == normalize_name(name)])
    if result.get("masks") is None:
        raise ValueError("the decoder returned neither a semantic map nor masks")
    scores = to_numpy(result["scores"]).astype(np.float64).reshape(-1)  # [n]
    names = [_phrase(out.phrases, int(label)) for label in to_numpy(result["labels"]).reshape(-1)]
    vocabulary = sorted({n for n in names if n is not None})
    threshold = TaskOptions().mask_score_threshold
    classes = [vocabulary.index(n) + 1 if n is not None and s > threshold else None for n, s in zip(names, scores)]
    painted = label_map_from_masks(result["masks"], scores, classes, shape)  # [H, W] class + 1, 0 where no mask

    def category(name: str) -> np.ndarray:
        key = normalize_name(name)
        return painted == vocabulary.index(key) + 1 if key in vocabulary else np.zeros(shape, dtype=bool)

    return category


def judge_segment(out: DecoderPrediction, expect: Mapping[str, Any]) -> Verdict:
    """For each category of ``expect["objects"]`` (``category``, RLE ``mask``), the predicted mask of the category
    has IoU >= 0.5 with the union of its ground-truth masks."""
    truth: dict[str, np.ndarray] = {}
    for obj in expect["objects"]:
        mask = _decode(obj["mask"])
        truth[obj["category"]] = truth[obj["category"]] | mask if obj["category"] in truth else mask
    predicted = _category_masks(out, next(iter(truth.values())).shape)
    ious = {}
    for name, gt in truth.items():
        inter, union = mask_counts(predicted(name), gt)
        ious[name] = inter / union if union else 0.0
    wrong = [name for name, iou in ious.items() if iou < IOU_THRESHOLD]
    listing = ", ".join(f"{name} {iou:.2f}" for name, iou in ious.items())
    return Verdict(not wrong, f"mask IoU per category (>= {IOU_THRESHOLD} needed): {listing}")


def judge_find(out: DecoderPrediction, expect: Mapping[str, Any]) -> Verdict:
    """The top-1 mask (or, without masks, the top-1 box) has IoU >= 0.5 with the referred shape's ``mask``
    (``box``)."""
    mask = top1(out.result, "masks")
    if mask is not None:
        inter, union = mask_counts(mask, _decode(expect["mask"]))
        iou, what = inter / union if union else 0.0, "mask"
    else:
        box = top1(out.result, "boxes")
        if box is None:
            return Verdict(False, "no instance found")
        gt = np.asarray(expect["box"], dtype=np.float64)[None]  # [1, 4]
        iou, what = float(aligned_box_iou(to_numpy(box).astype(np.float64).reshape(1, 4), gt)[0]), "box"
    name = expect.get("phrase", expect["expression"])
    verdict = "found" if iou >= IOU_THRESHOLD else "not found"
    return Verdict(iou >= IOU_THRESHOLD, f"the {name} {verdict}: top-1 {what} IoU {iou:.2f} (>= {IOU_THRESHOLD})")


def judge_pose(out: DecoderPrediction, expect: Mapping[str, Any], pose_token: str) -> Verdict:
    """PCK@:data:`PCK_ALPHA` over every keypoint of every ``expect["figures"]`` entry (``box``, ``keypoints``
    ``[Kp, 3]``, skeleton ``expect["keypoint_names"]``) is >= :data:`PCK_THRESHOLD`, predictions matched to figures
    as ``vllm2 bench pose`` matches them.

    Args:
        out: the pose decoder's output of a routed answer.
        expect: the ground truth.
        pose_token: the route token of keypoint groups.
    """
    _, keypoints = routed_keypoints(out, expect["category"], expect["keypoint_names"], pose_token)  # [n, Kp, 3]
    gt_boxes = [f["box"] for f in expect["figures"]]
    match = match_instances(out.result["boxes"], out.result["scores"], gt_boxes)
    preds = [None if j is None else keypoints[j] for j in match]
    value = pck(preds, [f["keypoints"] for f in expect["figures"]], gt_boxes, PCK_ALPHA)
    total = sum(len(f["keypoints"]) for f in expect["figures"])
    matched = sum(j is not None for j in match)
    return Verdict(value >= PCK_THRESHOLD, f"PCK@{PCK_ALPHA} {value:.2f} (>= {PCK_THRESHOLD}; {round(value * total)} "
                                           f"of {total} keypoints, {matched} of {len(match)} figures matched)")


def judge_draw(image: Image.Image, expect: Mapping[str, Any]) -> Verdict:
    """The image's dominant colour and shape class are ``expect["colour"]`` and ``expect["shape"]``."""
    colour, kind = dominant_colour(image), shape_class(image)
    right = colour == expect["colour"] and kind == expect["shape"]
    drawn = f"a {colour} {kind}" if colour and kind else "no shape"
    return Verdict(right, f"drew {drawn} for a {expect['colour']} {expect['shape']}")


def judge_edit(source: Image.Image, edited: Image.Image, expect: Mapping[str, Any]) -> Verdict:
    """:func:`~.image_judges.edit_correct` of the edit ``expect`` (``shape``, ``attribute``, ``value``)."""
    edit = {key: expect[key] for key in ("shape", "attribute", "value")}
    right = edit_correct(source, edited, edit)
    return Verdict(right, f"{edit['attribute']} of the {edit['shape']} to {edit['value']}: "
                          f"{'done, the rest kept' if right else 'not done, or the rest changed'}")


# ------------------------------------------------------------------------------------------------ dispatch

_TEXT_RULES: dict[str, Callable[[str, Mapping[str, Any]], Verdict]] = {"describe": judge_describe,
                                                                       "count": judge_count}
_ROUTE_TASKS = {"detect": "det", "segment": "semantic_seg", "find": "rec", "pose": "pose", "draw": "t2i",
                "edit": "edit"}  # rule -> the data task whose route (and decoder) answers it
RULES = (*_TEXT_RULES, *_ROUTE_TASKS)


def _judge_output(rule: str, out: DecoderPrediction, expect: Mapping[str, Any], routes: RouteTable,
                  image: Image.Image | None) -> Verdict:
    if rule in ("draw", "edit"):
        if not isinstance(out.result, Image.Image):
            return Verdict(False, f"the decoder returned {type(out.result).__name__}, not an image")
        if rule == "draw":
            return judge_draw(out.result, expect)
        if image is None:
            return Verdict(False, "the item has no input image to compare the edit with")
        return judge_edit(image, out.result, expect)
    if not isinstance(out.result, dict):
        return Verdict(False, f"the decoder returned {type(out.result).__name__}, not a result dict")
    if rule == "detect":
        return judge_detect(out, expect)
    if rule == "segment":
        return judge_segment(out, expect)
    if rule == "find":
        return judge_find(out, expect)
    return judge_pose(out, expect, routes.route_for_task("pose"))


def judge(result: ChatResult, expect: Mapping[str, Any], routes: RouteTable,
          image: Image.Image | None = None) -> Verdict:
    """Judge one chat answer by the rule ``expect["rule"]`` (one of :data:`RULES`); never raises.

    Args:
        result: the answer.
        expect: the ground truth (the rule's fields, see the module docstring).
        routes: the model's route table (which decoder answers each rule).
        image: the item's input image (edit compares against it).
    Returns:
        The verdict; wrong, with the reason, when the rule cannot run (no output of the decoder, a decoder error, a
        malformed result or ground truth).
    """
    rule = expect.get("rule")
    try:
        if rule in _TEXT_RULES:
            return _TEXT_RULES[rule](result.text, expect)
        if rule not in _ROUTE_TASKS:
            return Verdict(False, f"unknown rule {rule!r} (known: {list(RULES)})")
        token = routes.route_for_task(_ROUTE_TASKS[rule])
        out = from_chat(result, routes).outputs.get(routes.route(token).decoder)
        if out is None:
            written = ", ".join(dict.fromkeys(result.routes)) or "none"
            return Verdict(False, f"no {token} output (routes written: {written})")
        if out.error is not None:
            return Verdict(False, f"decoder error: {out.error}")
        if out.result is None:
            return Verdict(False, "the decoder returned no result")
        return _judge_output(rule, out, expect, routes, image)
    except Exception as err:  # a judge must not end the batch
        logger.warning("judging a %r answer failed", rule, exc_info=True)
        return Verdict(False, f"cannot judge: {type(err).__name__}: {err}")
