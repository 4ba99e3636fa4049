"""Annotation geometry of the data layer, checked against the drawn pixels of the example images. The example paths
and pixel helpers here are shared by the other ``test_data_*`` files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from vllm2.data.annotations import clean_name, decode_segmentation, mask_to_box, region_to_mask, xywh_to_xyxy

EXAMPLES = Path(__file__).resolve().parent.parent / "data" / "examples"
IMAGES = EXAMPLES / "images"
RED, BLUE, GREEN = (220, 30, 30), (30, 60, 220), (30, 170, 60)

def color_mask(name: str, color: tuple[int, int, int]) -> np.ndarray:
    """Pixels of an example image that have exactly ``color``."""
    return (np.asarray(Image.open(IMAGES / name).convert("RGB")) == color).all(-1)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# ---------------------------------------------------------------------------------------------------------------


def test_polygon_and_both_rle_forms_decode_to_the_drawn_shapes():
    red_a, blue_a = color_mask("shapes_a.png", RED), color_mask("shapes_a.png", BLUE)
    polygon = decode_segmentation([[6, 8, 26, 8, 26, 30, 6, 30]], 48, 64)
    assert polygon.shape == (48, 64) and np.array_equal(polygon, red_a)
    compressed = mask_utils.encode(np.asfortranarray(blue_a.astype(np.uint8)))
    as_string = {"size": [48, 64], "counts": compressed["counts"].decode()}
    assert np.array_equal(decode_segmentation(as_string, 48, 64), blue_a)
    flat = blue_a.flatten(order="F").astype(np.int64)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], edges])).tolist()
    assert np.array_equal(decode_segmentation({"size": [48, 64], "counts": counts}, 48, 64), blue_a)


def test_segmentation_errors_name_the_field():
    with pytest.raises(ValueError, match=r"segmentation.*RLE size"):
        decode_segmentation({"size": [10, 10], "counts": "abc"}, 48, 64)
    with pytest.raises(ValueError, match=r"ann.segmentation.*polygons"):
        decode_segmentation([[1, 2, 3]], 48, 64, "ann.segmentation")
    with pytest.raises(ValueError, match="polygons or an RLE"):
        decode_segmentation("nope", 48, 64)


def test_boxes_and_names():
    assert xywh_to_xyxy([6, 8, 20, 22]).tolist() == [6, 8, 26, 30]
    with pytest.raises(ValueError, match="bbox"):
        xywh_to_xyxy([1, 2, -3, 4])
    with pytest.raises(ValueError, match="4 numbers"):
        xywh_to_xyxy([1, 2, 3])
    assert mask_to_box(color_mask("shapes_a.png", RED)).tolist() == [6, 8, 26, 30]
    assert clean_name("left_eye ") == "left eye"


def test_region_prompts_of_every_kind():
    red = color_mask("shapes_a.png", RED)
    assert np.array_equal(region_to_mask({"box": [6, 8, 26, 30]}, 64, 48), red)
    assert np.array_equal(region_to_mask({"bbox": [6, 8, 20, 22]}, 64, 48), red)
    assert np.array_equal(region_to_mask({"polygon": [[6, 8, 26, 8, 26, 30, 6, 30]]}, 64, 48), red)
    point = region_to_mask({"point": [10, 12]}, 64, 48)
    assert point[12, 10] and 1 <= point.sum() < 20
    green = color_mask("shapes_b.png", GREEN)
    assert iou(region_to_mask({"polygon": [[8, 56, 40, 56, 24, 20]]}, 48, 64), green) > 0.85
    with pytest.raises(ValueError, match="exactly one of"):
        region_to_mask({"box": [0, 0, 2, 2], "point": [1, 1]}, 64, 48)
    with pytest.raises(ValueError, match="outside"):
        region_to_mask({"point": [100, 1]}, 64, 48)
