"""The demo judges (vllm2.bench.judges): each rule on hand-made right and wrong answers, and a judge that cannot run
says wrong with the reason instead of raising."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from superlink import RouteTable
from vllm2.bench.judges import (RULES, judge, judge_count, judge_describe, judge_detect, judge_draw, judge_edit,
                                judge_find, judge_pose, judge_segment)
from vllm2.bench.tasks import DecoderPrediction
from vllm2.chat import ChatResult, RouteOutput
from vllm2.shapes import COLOURS, PLAIN

ROUTES = RouteTable.default()
CATEGORIES = ["circle", "square", "triangle"]


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": encoded["counts"].decode("ascii")}


def box_mask(x1: int, y1: int, x2: int, y2: int, side: int = 40) -> np.ndarray:
    mask = np.zeros((side, side), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


# A 40x40 "scene" by hand: a square filling [4, 4, 14, 14) and a triangle-ish region filling [20, 20, 36, 30).
SQUARE, TRIANGLE = box_mask(4, 4, 14, 14), box_mask(20, 20, 36, 30)
OBJECTS = [{"category": "square", "phrase": "small red square", "box": [4.0, 4.0, 14.0, 14.0]},
           {"category": "triangle", "phrase": "large blue triangle", "box": [20.0, 20.0, 36.0, 30.0]}]
DETECT = {"rule": "detect", "objects": OBJECTS}
SEGMENT = {"rule": "segment", "objects": [{"category": "square", "mask": rle(SQUARE)},
                                          {"category": "triangle", "mask": rle(TRIANGLE)}]}
FIND = {"rule": "find", "expression": "red shape", "phrase": "small red square", "box": [4.0, 4.0, 14.0, 14.0],
        "mask": rle(SQUARE)}


def detections(boxes, labels, scores, **extra) -> DecoderPrediction:
    result = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.tensor(labels, dtype=torch.long), "scores": torch.tensor(scores), **extra}
    return DecoderPrediction(["[DET]"] * 3, list(CATEGORIES), result)


# ------------------------------------------------------------------------------------------------ text


@pytest.mark.parametrize("text, right", [
    ("a large yellow square and a small red triangle.", True),
    ("A large yellow square and a small red triangle", True),  # case and final period do not matter
    ("a small red triangle and a large yellow square.", False),  # shapes are captioned left to right
    ("a large yellow square.", False),
])
def test_describe(text, right):
    verdict = judge_describe(text, {"caption": "a large yellow square and a small red triangle."})
    assert verdict.right is right and "a large yellow square" in verdict.reason


@pytest.mark.parametrize("text, right", [("two", True), ("2", True), ("Two.", True), ("three", False),
                                         ("two shapes", False), ("", False)])
def test_count(text, right):
    assert judge_count(text, {"answer": "two"}).right is right


# ------------------------------------------------------------------------------------------------ detect


def test_detect_right_when_every_object_has_a_box_with_its_label():
    out = detections([[4, 4, 14, 14], [21, 20, 36, 31], [0, 30, 8, 38]], [1, 2, 0], [0.9, 0.8, 0.2])
    verdict = judge_detect(out, DETECT)
    assert verdict.right and "2 of 2" in verdict.reason


@pytest.mark.parametrize("boxes, labels, scores, missed", [
    ([[4, 4, 14, 14], [28, 20, 44, 30]], [1, 2], [0.9, 0.9], "large blue triangle"),  # shifted: IoU 8/24 < 0.5
    ([[4, 4, 14, 14], [20, 20, 36, 30]], [1, 0], [0.9, 0.9], "large blue triangle"),  # the box, the wrong label
    ([[4, 4, 14, 14], [20, 20, 36, 30]], [1, 2], [0.9, 0.2], "large blue triangle"),  # the box, score below 0.3
    ([[20, 20, 36, 30]], [2], [0.9], "small red square"),  # missing
    ([], [], [], "small red square, large blue triangle"),  # nothing detected
])
def test_detect_wrong(boxes, labels, scores, missed):
    verdict = judge_detect(detections(boxes, labels, scores), DETECT)
    assert not verdict.right and verdict.reason.endswith(f"missed: {missed}")


# ------------------------------------------------------------------------------------------------ segment


def semantic(groups: np.ndarray, phrases=CATEGORIES) -> DecoderPrediction:
    empty = torch.zeros(0)
    return DecoderPrediction(["[SEG]"] * len(phrases), list(phrases),
                             {"boxes": empty.reshape(0, 4), "scores": empty, "labels": empty.long(),
                              "semantic": torch.from_numpy(groups)})


def test_segment_semantic_map_right_and_wrong():
    groups = np.zeros((40, 40), dtype=np.int64)  # background painted as circle (absent, so not judged)
    groups[SQUARE], groups[TRIANGLE] = 1, 2
    assert judge_segment(semantic(groups), SEGMENT).right
    groups[:, 30:] = 2  # the triangle's class spills over the right quarter: IoU 160 / (400 + 100)
    verdict = judge_segment(semantic(groups), SEGMENT)
    assert not verdict.right and "triangle 0.32" in verdict.reason and "square 1.00" in verdict.reason


def test_segment_missing_category_is_wrong():
    groups = np.zeros((40, 40), dtype=np.int64)
    groups[SQUARE] = 1
    verdict = judge_segment(semantic(groups, ["circle", "square"]), SEGMENT)  # no triangle group at all
    assert not verdict.right and "triangle 0.00" in verdict.reason


def test_segment_instance_masks():
    masks = torch.from_numpy(np.stack([SQUARE, TRIANGLE, box_mask(0, 0, 40, 40)]))
    right = detections([[4, 4, 14, 14], [20, 20, 36, 30], [0, 0, 40, 40]], [1, 2, 0], [0.9, 0.8, 0.5], masks=masks)
    assert judge_segment(right, SEGMENT).right
    low = detections([[4, 4, 14, 14], [20, 20, 36, 30]], [1, 2], [0.9, 0.05], masks=masks[:2])  # below 0.1
    verdict = judge_segment(low, SEGMENT)
    assert not verdict.right and "triangle 0.00" in verdict.reason


# ------------------------------------------------------------------------------------------------ find


def grounding(boxes, scores, masks=None) -> DecoderPrediction:
    result = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
              "labels": torch.zeros(len(scores), dtype=torch.long)}
    if masks is not None:
        result["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, 40, 40, dtype=torch.bool)
    return DecoderPrediction(["[GRD]"], [""], result)


def test_find_by_top1_mask():
    assert judge_find(grounding([[4, 4, 14, 14]], [0.7], [SQUARE]), FIND).right
    # the best-scoring mask is the triangle; the square only comes second
    verdict = judge_find(grounding([[20, 20, 36, 30], [4, 4, 14, 14]], [0.9, 0.5], [TRIANGLE, SQUARE]), FIND)
    assert not verdict.right and "IoU 0.00" in verdict.reason
    assert not judge_find(grounding([[4, 4, 14, 14]], [0.9], [box_mask(9, 4, 19, 14)]), FIND).right  # IoU 1/3


def test_find_by_box_without_masks():
    assert judge_find(grounding([[5, 4, 15, 14]], [0.9]), FIND).right  # IoU 9/11
    verdict = judge_find(grounding([[9, 4, 19, 14]], [0.9]), FIND)  # IoU 50/150
    assert not verdict.right and "box IoU 0.33" in verdict.reason
    assert judge_find(grounding([], [], []), FIND).reason == "no instance found"


# ------------------------------------------------------------------------------------------------ pose

NAMES = ["head", "neck", "hip", "left hand", "right hand", "left foot", "right foot"]
FIGURE = np.array([[20, 12], [20, 16], [20, 30], [28, 24], [12, 24], [25, 48], [15, 48]], dtype=np.float64)
POSE = {"rule": "pose", "category": "stick figure", "keypoint_names": NAMES,
        "figures": [{"box": [10.0, 10.0, 30.0, 50.0], "keypoints": [[x, y, 2.0] for x, y in FIGURE]}]}


def pose_output(points: np.ndarray, names=NAMES, box=(10, 10, 30, 50)) -> DecoderPrediction:
    """One predicted figure; keypoint groups in the order of ``names``."""
    keypoints = torch.cat([torch.tensor(points, dtype=torch.float32), torch.ones(len(points), 1)], 1)[None]
    result = {"boxes": torch.tensor([box], dtype=torch.float32), "scores": torch.tensor([0.9]),
              "labels": torch.zeros(1, dtype=torch.long), "keypoints": keypoints}
    return DecoderPrediction(["[DET]"] + ["[POSE]"] * len(names), ["stick figure", *names], result)


def test_pose_right_within_a_tenth_of_the_box():
    assert judge_pose(pose_output(FIGURE + [3.0, 0.0]), POSE, "[POSE]").right  # 3 px < 0.1 x 40
    # groups written in another order are read by their phrases
    order = [6, 5, 4, 3, 2, 1, 0]
    verdict = judge_pose(pose_output(FIGURE[order], [NAMES[k] for k in order]), POSE, "[POSE]")
    assert verdict.right and "7 of 7" in verdict.reason


def test_pose_wrong():
    off = FIGURE.copy()
    off[:4] += [5.0, 0.0]  # four of seven keypoints 5 px off: PCK 3/7 < 0.5
    verdict = judge_pose(pose_output(off), POSE, "[POSE]")
    assert not verdict.right and "3 of 7" in verdict.reason
    # the right keypoints, but the predicted box misses the figure: no match, every keypoint wrong
    verdict = judge_pose(pose_output(FIGURE, box=(60, 60, 70, 70)), POSE, "[POSE]")
    assert not verdict.right and "0 of 1 figures matched" in verdict.reason
    # keypoint groups whose phrases name no keypoint are not read
    assert not judge_pose(pose_output(FIGURE, [f"part {k}" for k in range(7)]), POSE, "[POSE]").right


# ------------------------------------------------------------------------------------------------ draw and edit


def plain(shapes: list[tuple[str, str, tuple[int, int, int, int]]], side: int = 32) -> Image.Image:
    """Shapes (kind, colour, xyxy frame) drawn with PIL on the plain background."""
    image = Image.new("RGB", (side, side), PLAIN)
    draw = ImageDraw.Draw(image)
    for kind, colour, (x1, y1, x2, y2) in shapes:
        if kind == "square":
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=COLOURS[colour])
        elif kind == "circle":
            draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=COLOURS[colour])
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=COLOURS[colour])
    return image


@pytest.mark.parametrize("drawn, right", [
    (("square", "green"), True), (("square", "red"), False), (("triangle", "green"), False),
    (("circle", "green"), False)])
def test_draw(drawn, right):
    image = plain([(drawn[0], drawn[1], (6, 6, 26, 26))])
    assert judge_draw(image, {"colour": "green", "shape": "square"}).right is right


def test_draw_nothing_is_wrong():
    verdict = judge_draw(Image.new("RGB", (32, 32), PLAIN), {"colour": "green", "shape": "square"})
    assert not verdict.right and verdict.reason == "drew no shape for a green square"


def test_edit():
    source = plain([("triangle", "red", (2, 4, 16, 18)), ("square", "blue", (19, 19, 29, 29))])
    expect = {"rule": "edit", "shape": "triangle", "attribute": "colour", "value": "green"}
    assert judge_edit(source, plain([("triangle", "green", (2, 4, 16, 18)), ("square", "blue", (19, 19, 29, 29))]),
                      expect).right
    assert not judge_edit(source, source, expect).right  # nothing done
    assert not judge_edit(source, plain([("triangle", "green", (2, 4, 16, 18))]), expect).right  # the square lost
    assert not judge_edit(source, plain([("triangle", "yellow", (2, 4, 16, 18)),
                                         ("square", "blue", (19, 19, 29, 29))]), expect).right  # wrong colour


# ------------------------------------------------------------------------------------------------ dispatch


def test_judge_finds_the_output_by_decoder_and_never_raises():
    good = detections([[4, 4, 14, 14], [20, 20, 36, 30]], [1, 2], [0.9, 0.9])
    answer = ChatResult("circle[DET], square[DET], triangle[DET]", [
        RouteOutput("[DET]", "gdino", list(CATEGORIES), good.result)], routes=["[DET]"] * 3)
    assert judge(answer, DETECT, ROUTES).right
    assert judge(ChatResult("two"), {"rule": "count", "answer": "two"}, ROUTES).right

    no_route = judge(ChatResult("a circle"), DETECT, ROUTES)
    assert not no_route.right and no_route.reason == "no [DET] output (routes written: none)"
    failed = ChatResult("x[DET]", [RouteOutput("[DET]", "gdino", ["x"], None, "decoder 'gdino' failed: boom")],
                        routes=["[DET]"])
    assert judge(failed, DETECT, ROUTES).reason == "decoder error: decoder 'gdino' failed: boom"
    malformed = ChatResult("x[DET]", [RouteOutput("[DET]", "gdino", ["x"], {"scores": torch.ones(1)})],
                           routes=["[DET]"])
    verdict = judge(malformed, DETECT, ROUTES)
    assert not verdict.right and verdict.reason.startswith("cannot judge: KeyError")
    not_an_image = ChatResult("[GEN]", [RouteOutput("[GEN]", "sd", [""], {"boxes": torch.zeros(0, 4)})],
                              routes=["[GEN]"])
    assert "not an image" in judge(not_an_image, {"rule": "draw", "colour": "red", "shape": "circle"}, ROUTES).reason
    assert not judge(ChatResult("?"), {"rule": "guess"}, ROUTES).right
    assert set(RULES) == {"describe", "count", "detect", "segment", "find", "pose", "draw", "edit"}
