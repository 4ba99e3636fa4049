"""Readers on the example files of every format: items, turns, images, regions and targets (checked against the drawn
pixels and the annotation files), evaluation expansion, and malformed records in both modes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from superlink import RouteTable
from test_data_annotations import BLUE, EXAMPLES, GREEN, IMAGES, RED, color_mask, iou
from vllm2.data import (
    CocoDataset,
    CocoKeypointDataset,
    ConversationDataset,
    EditDataset,
    RecordError,
    RefCocoDataset,
    RegionDataset,
    Templates,
    TextToImageDataset,
)
from vllm2.tokenizer import IMAGE_TOKEN, REGION_TOKEN


@pytest.fixture
def templates():
    return Templates(RouteTable.default())


def _reader(cls, file, templates, mode="teacher_forced", root=IMAGES, **kwargs):
    return cls(EXAMPLES / file if isinstance(file, str) else file, root, templates=templates, mode=mode, **kwargs)


# ------------------------------------------------------------------------------------------------ formats


def test_llava_single_multi_text_only_and_implicit_images(templates):
    ds = _reader(ConversationDataset, "llava.json", templates)
    samples = [ds[i] for i in range(len(ds))]
    assert [len(s.images) for s in samples] == [1, 2, 0, 1]
    assert all(s.task == "chat" and not s.targets and not s.regions for s in samples)
    assert [role for role, _ in samples[0].turns] == ["user", "assistant", "user", "assistant"]
    assert samples[1].turns[0][1].count(IMAGE_TOKEN) == 2
    assert IMAGE_TOKEN not in samples[2].turns[0][1]
    assert samples[3].turns[0][1] == f"{IMAGE_TOKEN}\nDescribe the image."  # image placed at the start
    assert samples[1].images[1].size == (48, 64) and samples[1].images[1].mode == "RGB"
    assert samples[0].source == f"{EXAMPLES / 'llava.json'}[0]"
    question = _reader(ConversationDataset, "llava.json", templates, mode="question")[0]
    assert question.turns == samples[0].turns[:-1]


def test_coco_instances_boxes_labels_masks_match_the_image(templates):
    ds = _reader(CocoDataset, "coco_instances.json", templates, task="instance_seg")
    assert len(ds) == 2 and ds.names == ["red square", "blue circle", "green triangle", "yellow star"]
    assert ds.category_ids == [1, 2, 3, 5]
    first = ds[0].targets["gdino"]
    assert first["labels"].tolist() == [0, 1]  # evaluation: dataset order, label = position in the answer
    assert first["boxes"].tolist() == [[6, 8, 26, 30], [34, 14, 58, 40]]
    assert np.array_equal(first["masks"][0], color_mask("shapes_a.png", RED))  # polygon
    assert np.array_equal(first["masks"][1], color_mask("shapes_a.png", BLUE))  # compressed RLE
    second = ds[1].targets["gdino"]  # the crowd annotation is left out
    assert second["labels"].tolist() == [2, 0]
    assert iou(second["masks"][0], color_mask("shapes_b.png", GREEN)) > 0.85
    assert np.array_equal(second["masks"][1], color_mask("shapes_b.png", RED))  # uncompressed RLE
    det = _reader(CocoDataset, "coco_instances.json", templates, task="det")[0]
    assert "masks" not in det.targets["gdino"] and det.task == "det"


def test_coco_semantic_and_interactive(templates):
    semantic = _reader(CocoDataset, "coco_instances.json", templates, task="semantic_seg")[1]
    assert semantic.targets["gdino"]["labels"].tolist() == [0, 2]  # one merged instance per category
    inter = _reader(CocoDataset, "coco_instances.json", templates, task="interactive", prompt="box")
    sample = inter[0]
    assert len(sample.regions) == 2 and sample.turns[0][1].count(REGION_TOKEN) == 2
    assert np.array_equal(sample.regions[0][0], color_mask("shapes_a.png", RED)) and sample.regions[0][1] == 0
    assert sample.targets["gdino"]["labels"].tolist() == [0, 1]
    points = _reader(CocoDataset, "coco_instances.json", templates, task="interactive", prompt="point")[0]
    for (mask, _), target in zip(points.regions, points.targets["gdino"]["masks"]):
        assert mask.sum() < target.sum() and (mask & target).any()


def test_refcoco_train_and_eval_items(templates):
    evaluation = _reader(RefCocoDataset, "refcoco.jsonl", templates, task="res")
    assert len(evaluation) == 3  # one item per expression
    assert "the shape on the left" in evaluation[1].turns[0][1] and evaluation[1].source.endswith("[0] expression 1")
    assert "the green triangle" in evaluation[2].turns[0][1]  # refer-style "sentences"
    target = evaluation[0].targets["gdino"]
    assert target["boxes"].tolist() == [[6, 8, 26, 30]] and target["labels"].tolist() == [0]
    assert np.array_equal(target["masks"][0], color_mask("shapes_a.png", RED))
    train = _reader(RefCocoDataset, "refcoco.jsonl", templates, mode="train", task="rec")
    assert len(train) == 2 and "masks" not in train[0].targets["gdino"]


def test_keypoints_any_skeleton(templates):
    evaluation = _reader(CocoKeypointDataset, "coco_keypoints.json", templates)
    assert len(evaluation) == 2  # every image in evaluation, the empty one included
    raw = json.loads((EXAMPLES / "coco_keypoints.json").read_text())
    sample = evaluation[0]
    target = sample.targets["keypoint"]
    expected = np.array([a["keypoints"] for a in raw["annotations"]], dtype=np.float32).reshape(2, 6, 3)
    assert np.array_equal(target["keypoints"], expected) and target["keypoint_ids"].tolist() == list(range(6))
    assert target["boxes"].tolist() == [[6, 5, 26, 55], [36, 5, 56, 55]] and target["labels"].tolist() == [0, 0]
    assert "left hand" in sample.turns[0][1] and "stick figure" in sample.turns[0][1]
    assert evaluation[1].targets["keypoint"]["keypoints"].shape == (0, 6, 3)
    assert len(_reader(CocoKeypointDataset, "coco_keypoints.json", templates, mode="train")) == 1


def test_region_captions_and_region_vqa(templates):
    ds = _reader(RegionDataset, "regions.jsonl", templates)
    assert [ds.task_of(i) for i in range(4)] == ["region_caption", "region_caption", "region_vqa", "region_vqa"]
    caption = ds[0]
    assert caption.turns[1][1] == "a red square" and len(caption.regions) == 1
    assert np.array_equal(caption.regions[0][0], color_mask("shapes_a.png", RED))
    assert np.array_equal(ds[1].regions[0][0], color_mask("shapes_a.png", BLUE))  # RLE region
    vqa = ds[2]
    assert vqa.turns[0][1].count(REGION_TOKEN) == 2 and REGION_TOKEN not in vqa.turns[1][1]
    assert vqa.turns[1][1].startswith("region1 is a green triangle")
    assert iou(vqa.regions[0][0], color_mask("shapes_b.png", GREEN)) > 0.85 and vqa.regions[1][0][10, 37]


def test_text_to_image_and_edit(templates):
    t2i = _reader(TextToImageDataset, "t2i.jsonl", templates)[0]
    assert t2i.images == [] and IMAGE_TOKEN not in t2i.turns[0][1]
    assert t2i.targets["sd"]["caption"] == "a red square and a blue circle"
    assert np.array_equal(np.asarray(t2i.targets["sd"]["image"]), np.asarray(Image.open(IMAGES / "shapes_a.png")
                                                                              .convert("RGB")))
    edit = _reader(EditDataset, "edit.jsonl", templates)[0]
    assert color_mask("edit_in.png", RED).sum() == (np.asarray(edit.images[0]) == RED).all(-1).sum() > 0
    assert (np.asarray(edit.targets["ip2p"]["image"]) == BLUE).all(-1).sum() > 0


def test_default_image_root_is_the_annotation_folder(tmp_path, templates):
    shutil.copy(EXAMPLES / "t2i.jsonl", tmp_path)
    for name in ("shapes_a.png", "edit_out.png"):
        shutil.copy(IMAGES / name, tmp_path / name)
    assert TextToImageDataset(tmp_path / "t2i.jsonl", templates=templates)[1].targets["sd"]["image"].size == (32, 32)


# ------------------------------------------------------------------------------------------------ bad records


def _jsonl_with(tmp_path: Path, name: str, extra: str) -> Path:
    path = tmp_path / name
    path.write_text((EXAMPLES / name).read_text() + extra + "\n")
    return path


def _coco_with(tmp_path: Path, name: str, edit) -> Path:
    data = json.loads((EXAMPLES / name).read_text())
    edit(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _bad_annotation(data):
    data["annotations"][0]["bbox"] = [1, 2, "x", 4]


def _bad_keypoints(data):
    data["annotations"][1]["keypoints"] = data["annotations"][1]["keypoints"][:-3]


def _bad_llava(tmp_path):
    records = json.loads((EXAMPLES / "llava.json").read_text())
    records.insert(1, {"id": "broken", "image": "shapes_a.png", "conversations": [{"from": "gpt", "value": "hi"}]})
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    return path


def _llava_route(tmp_path):
    route = RouteTable.default().route_tokens[0]
    path = tmp_path / "route.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"say {route}"},
                                                    {"from": "gpt", "value": "no"}]}]))
    return path


CASES = {
    "llava_roles": (ConversationDataset, {}, _bad_llava, 1, "turns must alternate"),
    "coco_bbox": (CocoDataset, {"task": "det"},
                  lambda tmp: _coco_with(tmp, "coco_instances.json", _bad_annotation), 0, "annotations\\[0\\].bbox"),
    "keypoints_length": (CocoKeypointDataset, {},
                         lambda tmp: _coco_with(tmp, "coco_keypoints.json", _bad_keypoints), 0,
                         "annotations\\[1\\].keypoints"),
    "refcoco_no_bbox": (RefCocoDataset, {"task": "rec"},
                        lambda tmp: _jsonl_with(tmp, "refcoco.jsonl", '{"image": "a.png", "expressions": ["a"]}'),
                        2, "bbox"),
    "regions_two_kinds": (RegionDataset, {}, lambda tmp: _jsonl_with(
        tmp, "regions.jsonl", '{"image": "shapes_a.png", "regions": [{"box": [0, 0, 5, 5], "point": [1, 1]}], '
                              '"caption": "x"}'), 4, "exactly one of"),
    "t2i_missing_image": (TextToImageDataset, {},
                          lambda tmp: _jsonl_with(tmp, "t2i.jsonl", '{"image": "nope.png", "caption": "a cat"}'),
                          2, "does not exist"),
    "edit_invalid_json_line": (EditDataset, {}, lambda tmp: _jsonl_with(tmp, "edit.jsonl", '{"input": '),
                               2, "not valid JSON"),
    "llava_route_text": (ConversationDataset, {}, _llava_route, 0, "special token"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_raises_naming_file_and_index(tmp_path, templates, case):
    cls, kwargs, make, index, reason = CASES[case]
    path = make(tmp_path)
    ds = cls(path, IMAGES, templates=templates, mode="train", **kwargs)
    source = ds.source(index)
    assert str(path) in source
    with pytest.raises(RecordError, match=reason) as info:
        ds[index]
    assert str(info.value).startswith(source) and info.value.source == source


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_is_skipped_and_counted(tmp_path, templates, case):
    cls, kwargs, make, index, reason = CASES[case]
    ds = cls(make(tmp_path), IMAGES, templates=templates, mode="train", skip_bad_records=True, **kwargs)
    items = [ds[i] for i in range(len(ds))]
    assert items[index] is None
    assert sum(item is None for item in items) == 1  # the others are read normally, nothing replaced
    ds[index]
    assert len(ds.bad_records) == 1 and ds.bad_count == 2  # listed once, counted per read
    assert ds.bad_records[0].source == ds.source(index)
    assert re.search(reason, ds.bad_records[0].reason)


def test_corrupt_image_and_size_mismatch(tmp_path, templates):
    (tmp_path / "shapes_a.png").write_bytes(b"not a png at all")
    with pytest.raises(RecordError, match=r"images\[0\] \(id 10\).*cannot read image"):
        CocoDataset(EXAMPLES / "coco_instances.json", tmp_path, templates=templates)[0]
    shutil.copy(IMAGES / "shapes_b.png", tmp_path / "shapes_a.png")  # a 48x64 image where 64x48 is annotated
    with pytest.raises(RecordError, match="48x64 but the annotation says 64x48"):
        CocoDataset(EXAMPLES / "coco_instances.json", tmp_path, templates=templates)[0]


def test_annotation_of_unknown_image(tmp_path, templates):
    path = _coco_with(tmp_path, "coco_instances.json", lambda d: d["annotations"].append({"image_id": 999}))
    with pytest.raises(RecordError, match=r"annotations\[5\]"):
        CocoDataset(path, IMAGES, templates=templates)
    ds = CocoDataset(path, IMAGES, templates=templates, skip_bad_records=True)
    assert [b.source for b in ds.bad_records] == [f"{path} annotations[5]"] and ds[0] is not None


def test_unusable_files_raise_at_construction(tmp_path, templates):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        ConversationDataset(tmp_path / "bad.json", IMAGES, templates=templates)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        ConversationDataset(tmp_path / "missing.json", IMAGES, templates=templates)
    with pytest.raises(FileNotFoundError, match="image root"):
        ConversationDataset(EXAMPLES / "llava.json", tmp_path / "none", templates=templates)
    route = RouteTable.default().route_tokens[0]
    path = _coco_with(tmp_path, "coco_instances.json", lambda d: d["categories"][0].update(name=f"cat {route}"))
    with pytest.raises(ValueError, match="category name contains the special token"):
        CocoDataset(path, IMAGES, templates=templates)
    path = _coco_with(tmp_path, "coco_keypoints.json", lambda d: d["categories"][0].update(keypoints=["a", ""]))
    with pytest.raises(ValueError, match=r"coco_keypoints.json.*keypoints\[1\]"):
        CocoKeypointDataset(path, IMAGES, templates=templates)
