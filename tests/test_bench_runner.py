"""Benchmark runner: metric dispatch with fake predictors (routed and teacher-forced) equals the metric functions
called directly; routing misses; sharded runs (gloo) equal one process; the CLI checks files before any compute,
hashes weights and writes the result JSON."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import re
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import make_image
from superlink import RouteTable
from vllm2.bench import runner
from vllm2.bench.metrics_clip import clip_score, edit_metrics, load_clip_scorer
from vllm2.bench.metrics_coco import coco_eval
from vllm2.bench.metrics_ground import pck, rec_accuracy, res_iou
from vllm2.bench.metrics_text import caption_metrics, vqa_accuracy
from vllm2.bench.tasks import DecoderPrediction, SamplePrediction, TaskOptions, build_task
from vllm2.data.templates import Templates

ROUTES = RouteTable.default()
REPO = Path(__file__).resolve().parent.parent
W, H = 64, 48
NAMES = ["cat", "traffic_light"]  # the reader cleans "traffic_light" to "traffic light"
CAT_IDS = [3, 7]


def _rect(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def write_images(folder: Path, count: int) -> list[str]:
    names = []
    for i in range(count):
        make_image(W, H, seed=i).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


def write_coco(folder: Path, missing_image: bool = False) -> Path:
    """3 images, categories 3 (cat) and 7 (traffic_light), 2-3 boxes each with rectangle polygons."""
    names = write_images(folder, 3)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i, name in enumerate(names):
        images.append({"id": 10 + i, "file_name": "nope.png" if missing_image and i == 2 else name, "width": W,
                       "height": H})
        for _ in range(2 + i % 2):
            x, y = float(rng.integers(0, W - 24)), float(rng.integers(0, H - 20))
            w, h = float(rng.integers(10, 24)), float(rng.integers(10, 20))
            anns.append({"id": len(anns) + 1, "image_id": 10 + i, "category_id": int(rng.choice(CAT_IDS)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0, "segmentation": _rect(x, y, w, h)})
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": c, "name": n} for c, n in zip(CAT_IDS, NAMES)]}))
    return path


def _dataset(task_name: str, path: Path, mode: str = "question", options: TaskOptions | None = None):
    task = build_task(task_name, options).bind(ROUTES)
    return task, task.build_dataset(path, None, Templates(ROUTES), mode)


# ------------------------------------------------------------------------------------------------ detection

def _det_prediction(index: int, target: dict, routed: bool, with_masks: bool = False) -> SamplePrediction:
    """Shifted GT boxes (index-dependent) and one false positive; routed: categories written in reverse order."""
    boxes = np.asarray(target["boxes"], dtype=np.float64) + (index % 3)  # [N, 4]
    boxes = np.concatenate([boxes, [[0.0, 0.0, 8.0, 8.0]]])
    vocab = np.concatenate([np.asarray(target["labels"]), [0]])  # dataset vocabulary index
    labels = (len(NAMES) - 1 - vocab) if routed else vocab
    phrases = ["Traffic light", "cat"] if routed else None
    result = {"boxes": torch.tensor(boxes), "scores": torch.linspace(0.9, 0.3, len(boxes)),
              "labels": torch.tensor(labels)}
    if with_masks:
        masks = np.zeros((len(boxes), H, W), dtype=bool)
        for k, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
            masks[k, y1:y2, x1:x2] = True
        result["masks"] = torch.from_numpy(masks)
    token = "[DET]"
    return SamplePrediction("", [token] * 2, {"gdino": DecoderPrediction([token] * 2, phrases, result)})


def _image_position(sample) -> int:
    """The position of a COCO reader's sample in the file's image list (from its source string)."""
    return int(sample.source.split("images[")[1].split("]")[0])


def _coco_records(index: int, image_id: int, pred: SamplePrediction, routed: bool) -> list[dict]:
    """The COCO result records a correct dispatch must produce, written out directly."""
    result = pred.outputs["gdino"].result
    records = []
    for box, score, label in zip(result["boxes"].tolist(), result["scores"].tolist(), result["labels"].tolist()):
        vocab = len(NAMES) - 1 - label if routed else label
        records.append({"image_id": image_id, "category_id": CAT_IDS[vocab],
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score})
    return records


def _det_expected(path: Path, dataset, routed: bool, items: list[int]) -> dict:
    """COCO bbox metrics of :func:`_det_prediction` on ``items`` (the others missed), by pycocotools directly."""
    records = []
    for i in items:
        records += _coco_records(i, 10 + i, _det_prediction(i, dataset[i].targets["gdino"], routed), routed)
    return coco_eval(str(path), records, "bbox", image_ids=[10, 11, 12])


@pytest.mark.parametrize("routed", [True, False])
def test_det_dispatch_equals_coco_eval(tmp_path, routed):
    path = write_coco(tmp_path)
    task, dataset = _dataset("det", path, "question" if routed else "teacher_forced")
    assert task.expected_routes() == ("[DET]",) and task.decoder() == "gdino"

    def predict(samples):
        preds = []
        for s in samples:
            index = _image_position(s)
            pred = _det_prediction(index, s.targets["gdino"], routed)
            if routed and index == 1:
                pred.routes = ["[GRD]"]  # the wrong route: a miss
            preds.append(pred)
        return preds

    mode = "routed" if routed else "teacher-forced"
    got = runner.evaluate(task, dataset, predict, mode, batch_size=2)
    expected = _det_expected(path, dataset, routed, [0, 2] if routed else [0, 1, 2])
    assert got["metrics"]["bbox"] == expected
    assert 0 < expected["AP"] < 1
    assert got["num_samples"] == 3
    if routed:
        assert got["routing_accuracy"] == pytest.approx(2 / 3)
        assert got["misrouted"] == {"count": 1, "first": [f"{dataset[1].source}: routes [GRD], expected [DET]: ''"]}
    else:
        assert "routing_accuracy" not in got and "misrouted" not in got


def test_seg_dispatch_reports_bbox_and_segm(tmp_path):
    path = write_coco(tmp_path)
    task, dataset = _dataset("seg", path)
    assert task.decoder_options() == {"gdino": {"mode": "det", "return_masks": True}}

    def predict(samples):
        return [_det_prediction(_image_position(s), s.targets["gdino"], True, with_masks=True) for s in samples]

    got = runner.evaluate(task, dataset, predict, "routed", batch_size=1)["metrics"]
    assert set(got) == {"bbox", "segm"} and 0 < got["segm"]["AP"] < 1


def _failed(routes: list[str], decoder: str, error: str, unconfigured: bool = False) -> SamplePrediction:
    """A prediction whose ``decoder`` output failed (or has no configured decoder)."""
    out = DecoderPrediction(routes, ["x"] * len(routes), None, error, unconfigured)
    return SamplePrediction("", routes, {decoder: out})


def test_decoder_failures_are_counted_and_scored_as_misses(tmp_path):
    """Item 1's decoder raised, item 2 routed to an unconfigured decoder: both are misses in the metrics and each
    is counted, with its sample's source, in the summary (the same keys for a text task)."""
    path = write_coco(tmp_path)
    task, dataset = _dataset("det", path)
    failed = {1: _failed(["[DET]"] * 2, "gdino", "decoder 'gdino' failed: boom"),
              2: _failed(["[DET]"] * 2, "gdino", "no decoder 'gdino' is configured for the route [DET]", True)}

    def predict(samples):
        return [failed.get(_image_position(s)) or _det_prediction(_image_position(s), s.targets["gdino"], True)
                for s in samples]

    got = runner.evaluate(task, dataset, predict, "routed", batch_size=2)
    assert got["metrics"]["bbox"] == _det_expected(path, dataset, True, [0]) and got["routing_accuracy"] == 1.0
    assert got["decoder_errors"] == {"count": 1, "first": [f"{dataset[1].source}: decoder 'gdino' failed: boom"]}
    assert got["unconfigured_routes"] == {
        "count": 1, "first": [f"{dataset[2].source}: no decoder 'gdino' is configured for the route [DET]"]}

    names = write_images(tmp_path, 7)
    vqa = _write_jsonl(tmp_path / "vqa.jsonl", [{"image": n, "question": "q?", "answers": ["a"]} for n in names])
    task, dataset = _dataset("vqa", vqa)

    def answer(samples):
        return [_failed(["[GEN]"], "sd", f"decoder 'sd' failed: {s.source}") for s in samples]

    got = runner.evaluate(task, dataset, answer, "routed", batch_size=3)
    sources = [dataset[i].source for i in range(5)]
    assert got["decoder_errors"] == {"count": 7, "first": [f"{s}: decoder 'sd' failed: {s}" for s in sources]}
    assert got["unconfigured_routes"] == {"count": 0, "first": []} and got["routing_accuracy"] == 0.0


def test_unknown_phrase_is_dropped(tmp_path):
    task, dataset = _dataset("det", write_coco(tmp_path))
    out = DecoderPrediction(["[DET]"] * 3, ["cat", "zebra", "traffic-light"], None)
    assert task.category_ids(dataset, out) == [3, None, 7]


# ------------------------------------------------------------------------------------------------ grounding

def write_refcoco(folder: Path) -> Path:
    names = write_images(folder, 2)
    records = [{"image": names[0], "bbox": [4, 4, 20, 16], "segmentation": _rect(4, 4, 20, 16),
                "expressions": ["the left box", "a box"]},
               {"image": names[1], "bbox": [30, 10, 24, 30], "segmentation": _rect(30, 10, 24, 30),
                "sentences": [{"sent": "the tall one"}, {"sent": "right"}]}]
    path = folder / "refs.json"
    path.write_text(json.dumps(records))
    return path


def _grd_prediction(k: int, target: dict) -> SamplePrediction:
    """Item 0 exact, 1 shifted by a quarter of the width, 2 far off, 3 missed (no route)."""
    box = np.asarray(target["boxes"][0], dtype=np.float64)
    shift = [0.0, (box[2] - box[0]) / 4, 40.0, 0.0][k]
    pred_box = box + np.array([shift, 0, shift, 0])
    mask = np.zeros((H, W), dtype=bool)
    x1, y1, x2, y2 = np.clip(pred_box, 0, [W, H, W, H]).astype(int)
    mask[y1:y2, x1:x2] = True
    result = {"boxes": torch.tensor(np.stack([pred_box, box + 30])), "scores": torch.tensor([0.9, 0.2]),
              "labels": torch.zeros(2, dtype=torch.long), "masks": torch.from_numpy(np.stack([mask, ~mask]))}
    routes = [] if k == 3 else ["[GRD]"]
    return SamplePrediction("", routes, {"gdino": DecoderPrediction(routes, ["it"] * len(routes), result)})


@pytest.mark.parametrize("name", ["rec", "res"])
def test_grounding_dispatch(tmp_path, name):
    task, dataset = _dataset(name, write_refcoco(tmp_path))
    assert len(dataset) == 4 and task.expected_routes() == ("[GRD]",)
    calls = iter(range(4))

    def predict(samples):
        return [_grd_prediction(next(calls), s.targets["gdino"]) for s in samples]

    got = runner.evaluate(task, dataset, predict, "routed", batch_size=3)
    samples = [dataset[i] for i in range(4)]
    preds = [_grd_prediction(k, s.targets["gdino"]) for k, s in enumerate(samples)]
    top_boxes = [p.outputs["gdino"].result["boxes"][0] for p in preds[:3]] + [None]
    gt_boxes = [s.targets["gdino"]["boxes"][0] for s in samples]
    assert got["metrics"]["Acc@0.5"] == rec_accuracy(top_boxes, gt_boxes) == 0.5
    assert got["routing_accuracy"] == 0.75
    if name == "res":
        top_masks = [p.outputs["gdino"].result["masks"][0] for p in preds[:3]] + [None]
        expected = res_iou(top_masks, [s.targets["gdino"]["masks"][0] for s in samples])
        assert got["metrics"]["cIoU"] == pytest.approx(expected["cIoU"]) and 0 < expected["cIoU"] < 1
        assert got["metrics"]["mIoU"] == pytest.approx(expected["mIoU"])


# ------------------------------------------------------------------------------------------------ pose

KP_NAMES = ["nose", "left_eye", "right_eye"]


def write_keypoints(folder: Path) -> Path:
    names = write_images(folder, 2)
    rng = np.random.default_rng(3)
    images, anns = [], []
    for i, name in enumerate(names):
        images.append({"id": 20 + i, "file_name": name, "width": W, "height": H})
        for _ in range(2):
            x, y = rng.uniform(0, 30, size=2)
            pts = np.concatenate([rng.uniform(0, 20, size=(3, 2)) + [x, y], np.full((3, 1), 2.0)], 1)
            anns.append({"id": len(anns) + 1, "image_id": 20 + i, "category_id": 1, "bbox": [x, y, 20.0, 20.0],
                         "area": 400.0, "iscrowd": 0, "keypoints": pts.reshape(-1).tolist(), "num_keypoints": 3})
    path = folder / "person_keypoints.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "person", "keypoints": KP_NAMES}]}))
    return path


def _pose_prediction(k: int, target: dict, routed: bool) -> tuple[SamplePrediction, np.ndarray]:
    """Noisy GT keypoints; routed: keypoint groups written as (right eye, nose, left eye). Also returns the
    keypoints in skeleton order."""
    rng = np.random.default_rng(k)
    skeleton = np.asarray(target["keypoints"], dtype=np.float64).copy()  # [N, 3, 3]
    skeleton[..., :2] += rng.normal(0, 1.0 + 2 * k, size=skeleton[..., :2].shape)
    skeleton[..., 2] = 1.0
    order = [2, 0, 1] if routed else [0, 1, 2]
    result = {"keypoints": torch.tensor(skeleton[:, order]), "scores": torch.tensor([0.8, 0.6][: len(skeleton)]),
              "labels": torch.zeros(len(skeleton), dtype=torch.long), "boxes": torch.tensor(target["boxes"])}
    groups = ["[DET]", "[POSE]", "[POSE]", "[POSE]"]
    phrases = ["person", "right eye", "nose", "left eye"] if routed else None
    return SamplePrediction("", ["[DET]", "[POSE]"], {"keypoint": DecoderPrediction(groups, phrases, result)}), skeleton


@pytest.mark.parametrize("routed", [True, False])
def test_pose_dispatch(tmp_path, routed):
    path = write_keypoints(tmp_path)
    task, dataset = _dataset("pose", path, "question" if routed else "teacher_forced", TaskOptions(pck_alpha=0.1))
    assert task.decoder() == "keypoint" and set(task.expected_routes()) == {"[DET]", "[POSE]"}

    def predict(samples):
        return [_pose_prediction(_image_position(s), s.targets["keypoint"], routed)[0]
                for s in samples]

    got = runner.evaluate(task, dataset, predict, "routed" if routed else "teacher-forced", batch_size=2)
    keypoints, pck_value = _pose_expected(path, dataset, routed, 0.1)
    assert got["metrics"]["keypoints"] == keypoints
    assert 0 < got["metrics"]["keypoints"]["AP"] < 1
    assert got["metrics"]["PCK@0.1"] == pytest.approx(pck_value)


def _pose_expected(path: Path, dataset, routed: bool, alpha: float) -> tuple[dict, float]:
    """Keypoint AP (pycocotools) and PCK@alpha of :func:`_pose_prediction` on both items, computed directly."""
    records, tops, gts, boxes = [], [], [], []
    for i in range(2):
        target = dataset[i].targets["keypoint"]
        _, skeleton = _pose_prediction(i, target, routed)
        for kpts, score in zip(skeleton, [0.8, 0.6]):
            records.append({"image_id": 20 + i, "category_id": 1, "keypoints": kpts.reshape(-1).tolist(),
                            "score": score})
        tops += list(skeleton)  # each prediction lies on its own ground-truth box, so it is matched to it
        gts += list(target["keypoints"])
        boxes += list(target["boxes"])
    return coco_eval(str(path), records, "keypoints"), pck(tops, gts, boxes, alpha)


def test_teacher_forced_batched_equals_per_sample(tmp_path):
    """Left-padded batches of different lengths (3- and 5-keypoint prompts) give the per-sample predictions."""
    from vllm2 import VisionLLMv2Processor, build_model, load_config
    from vllm2.data.coco import CocoKeypointDataset
    from vllm2.processor import Sample

    path = write_keypoints(tmp_path)
    data = json.loads(path.read_text())
    data["categories"].append({"id": 2, "name": "bird", "keypoints": ["beak", "tail", "left wing", "right wing",
                                                                       "left foot"]})
    path.write_text(json.dumps(data))
    cfg = load_config("tiny")
    model, processor = build_model(cfg).eval(), VisionLLMv2Processor.from_config(cfg)
    dataset = CocoKeypointDataset(path, templates=Templates(processor.routes), mode="teacher_forced")
    samples = [dataset[0], dataset[1]]  # the same image with the person and the bird skeleton
    batch = processor([Sample(s.turns, s.images) for s in samples], padding_side="left")
    assert not batch["attention_mask"][0, 0] and batch["attention_mask"][1, 0]  # the shorter prompt is padded
    predict = runner.teacher_forced_predictor(model, processor)
    batched, single = predict(samples), [predict([s])[0] for s in samples]
    for b, s, num in zip(batched, single, (3, 5)):
        rb, rs = b.outputs["keypoint"].result, s.outputs["keypoint"].result
        assert b.outputs["keypoint"].group_routes == ["[DET]"] + ["[POSE]"] * num
        assert rb["keypoints"].shape[1] == num
        assert torch.allclose(rb["keypoints"], rs["keypoints"], atol=1e-4)
        assert torch.allclose(rb["scores"], rs["scores"], atol=1e-6)
    task = build_task("pose").bind(processor.routes)
    with pytest.raises(ValueError, match="one skeleton size per file"):
        task.build_dataset(path, None, Templates(processor.routes), "teacher_forced")


# ------------------------------------------------------------------------------------------------ text tasks

def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def test_vqa_and_caption_dispatch(tmp_path):
    names = write_images(tmp_path, 3)
    humans = [["two"] * 3 + ["3"] * 7, ["dog"] + ["cat"] * 9, ["yes"] * 10]
    types = ["number", "other", "number"]
    vqa = _write_jsonl(tmp_path / "vqa.jsonl", [{"image": n, "question": f"q{i}?", "answers": a, "question_type": t}
                                               for i, (n, a, t) in enumerate(zip(names, humans, types))])
    task, dataset = _dataset("vqa", vqa)
    assert dataset[0].turns == [("user", "<image>\nq0? Answer the question using a single word or phrase.")]
    texts = ["2", "The dog.", "yes [DET]"]

    def answer(samples):
        return [SamplePrediction(t, runner.routes_in_text(t, ROUTES)) for t in texts[: len(samples)]]

    got = runner.evaluate(task, dataset, answer, "routed", batch_size=3)
    assert got["metrics"]["accuracy"] == pytest.approx(vqa_accuracy(["2", "The dog.", ""], humans))
    assert got["metrics"]["accuracy"] == pytest.approx((0.9 + 0.3 + 0.0) / 3)  # a routed answer is a miss
    assert got["routing_accuracy"] == pytest.approx(2 / 3)
    assert got["metrics"]["accuracy_by_type"] == pytest.approx({"number": 0.45, "other": 0.3})
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"image": names[0], "question": "q?", "answers": ["a"],
                                                 "question_type": 3}])
    with pytest.raises(ValueError, match="question_type"):
        _dataset("vqa", bad)[1][0]

    refs = [["a red car", "a car"], ["blue sky"], ["green grass here"]]
    cap = _write_jsonl(tmp_path / "cap.jsonl", [{"image": n, "captions": r} for n, r in zip(names, refs)])
    task, dataset = _dataset("caption", cap)
    texts = ["a red car", "the blue sky", "grass"]
    got = runner.evaluate(task, dataset, answer, "routed", batch_size=3)
    assert got["metrics"] == pytest.approx(dict(caption_metrics(texts, refs)))
    assert got["metrics"]["CIDEr"] > 0


# ------------------------------------------------------------------------------------------------ gen / edit

@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    cfg = json.loads((REPO / "configs/open_clip/vllm2-tiny-vit.json").read_text())
    cfg["text_cfg"]["vocab_size"] = 49408
    (folder / "bench-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    torch.save(open_clip.create_model("bench-tiny-clip").state_dict(), folder / "clip.pt")
    return folder / "clip.pt"


def test_gen_and_edit_dispatch(tmp_path, clip_weights):
    scorer = load_clip_scorer("bench-tiny-clip", clip_weights)
    names = write_images(tmp_path, 3)
    gen = _write_jsonl(tmp_path / "t2i.jsonl", [{"image": n, "caption": f"picture number {i}"}
                                                for i, n in enumerate(names)])
    task, dataset = _dataset("gen", gen, options=TaskOptions(clip=scorer))
    outputs = [make_image(W, H, seed=10 + i) for i in range(3)]

    def draw(samples):
        preds = []
        for s in samples:
            i = int(s.source.rsplit("[", 1)[1].rstrip("]"))
            routes = ["[GEN]"] if i != 2 else []
            preds.append(SamplePrediction("", routes, {"sd": DecoderPrediction(routes, ["it"], outputs[i])}))
        return preds

    got = runner.evaluate(task, dataset, draw, "routed", batch_size=2)["metrics"]
    per = [clip_score(scorer, [outputs[i]], [f"picture number {i}"]) for i in range(2)] + [0.0]
    assert got["CLIP-score"] == pytest.approx(np.mean(per), abs=1e-5) and got["missing"] == 1

    edit = _write_jsonl(tmp_path / "edit.jsonl", [
        {"input": names[0], "instruction": "make it red", "output": names[1]},
        {"input": names[1], "instruction": "add a box", "output": names[2], "input_caption": "boxes",
         "output_caption": "more boxes"}])
    task, dataset = _dataset("edit", edit, options=TaskOptions(clip=scorer))

    def edit_images(samples):
        return [SamplePrediction("", ["[EDIT]"], {"ip2p": DecoderPrediction(["[EDIT]"], ["it"], outputs[k])})
                for k in range(len(samples))]

    got = runner.evaluate(task, dataset, edit_images, "routed", batch_size=2)["metrics"]
    first = edit_metrics(scorer, [dataset[0].images[0]], [outputs[0]], [dataset[0].targets["ip2p"]["image"]],
                         ["make it red"])
    second = edit_metrics(scorer, [dataset[1].images[0]], [outputs[1]], [dataset[1].targets["ip2p"]["image"]],
                          ["add a box"], ["boxes"], ["more boxes"])
    for key in ("CLIP-I", "CLIP-T", "CLIP-dir"):
        assert got[key] == pytest.approx((first[key] + second[key]) / 2, abs=1e-5)


def _image_answers(decoder: str, route: str, images: list):
    """A predictor answering item ``i`` with ``images[i]`` through ``route``; items past the list are misses."""
    def predict(samples):
        indices = [int(s.source.rsplit("[", 1)[1].rstrip("]")) for s in samples]
        return [SamplePrediction("", [route], {decoder: DecoderPrediction([route], ["x"], images[i])})
                if i < len(images) else SamplePrediction("no route") for i in indices]
    return predict


def test_gen_and_edit_shapes_judge(tmp_path):
    """``judge="shapes"``: the generator's own images score 1, a blank or unedited image 0, a miss 0."""
    from PIL import Image

    from vllm2 import shapes

    shapes.write_dataset(tmp_path, n=4, seed=5, gen_size=32)
    with pytest.raises(ValueError, match="CLIP"):
        _dataset("gen", tmp_path / "t2i.jsonl")[0].check_options()
    task, dataset = _dataset("gen", tmp_path / "t2i.jsonl", options=TaskOptions(judge="shapes"))
    task.check_options()
    blank = Image.new("RGB", (32, 32), shapes.PLAIN)
    drawn = [dataset[0].targets["sd"]["image"], dataset[1].targets["sd"]["image"], blank]

    got = runner.evaluate(task, dataset, _image_answers("sd", "[GEN]", drawn), "routed", batch_size=3)["metrics"]
    assert got == {"colour_accuracy": 0.5, "shape_accuracy": 0.5, "missing": 1}

    task, dataset = _dataset("edit", tmp_path / "edit.jsonl", options=TaskOptions(judge="shapes"))
    edited = [dataset[0].targets["ip2p"]["image"], dataset[1].targets["ip2p"]["image"], dataset[2].images[0]]

    got = runner.evaluate(task, dataset, _image_answers("ip2p", "[EDIT]", edited), "routed", batch_size=3)["metrics"]
    assert got == {"edit_accuracy": 0.5, "missing": 1}


# ------------------------------------------------------------------------------------------------ sharding

def test_shard_and_merge():
    blocks = [runner.shard(range(7), r, 3) for r in range(3)]
    assert blocks == [[0, 1], [2, 3], [4, 5, 6]]
    parts = [[(i, True, {"v": i}, []) for i in block] for block in reversed(blocks)]
    assert [r[0] for r in runner.merge_records(parts)] == list(range(7))
    with pytest.raises(ValueError, match="item 2"):
        runner.merge_records([[(2, True, {}, [])], [(2, True, {}, [])]])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _predict_det(failing: int | None = None, crash_on: int | None = None):
    """The det predictor of the dispatch tests; item ``failing`` gets a decoder error, item ``crash_on`` raises."""
    def predict(samples):
        preds = []
        for s in samples:
            index = _image_position(s)
            if index == crash_on:
                raise RuntimeError(f"predictor crashed on item {index}")
            preds.append(_failed(["[DET]"], "gdino", "decoder 'gdino' failed: boom") if index == failing
                         else _det_prediction(index, s.targets["gdino"], True))
        return preds
    return predict


def _sharded_worker(rank: int, world: int, port: int, path: str, crash_on: int | None, queue) -> None:
    """Run the det task over ``world`` gloo ranks; put ``(rank, summary or the error message)`` on ``queue``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    task, dataset = _dataset("det", Path(path))
    try:
        queue.put((rank, runner.evaluate_sharded(task, dataset, _predict_det(2, crash_on), "routed", batch_size=2)))
    except RuntimeError as err:
        queue.put((rank, str(err)))
    dist.barrier()
    dist.destroy_process_group()


def _run_sharded(path: Path, crash_on: int | None = None) -> dict[int, Any]:
    """What each of 2 ranks returned (or raised) from :func:`runner.evaluate_sharded`."""
    ctx = mp.get_context("fork")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_sharded_worker, args=(r, 2, port, str(path), crash_on, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return got


def test_sharded_run_equals_single_process(tmp_path):
    """Two gloo ranks (items 0 | 1, 2; item 2 with a decoder error) merge into the single-process summary, failure
    counts included."""
    path = write_coco(tmp_path)
    task, dataset = _dataset("det", path)
    single = runner.evaluate(task, dataset, _predict_det(failing=2), "routed", batch_size=2)
    assert single["decoder_errors"] == {"count": 1, "first": [f"{dataset[2].source}: decoder 'gdino' failed: boom"]}
    assert 0 < single["metrics"]["bbox"]["AP"] < 1  # a real score, not the -1 of no detections
    sharded = _run_sharded(path)
    assert sharded == {0: single, 1: None}


def test_sharded_run_stops_every_rank_when_one_fails(tmp_path):
    """Rank 1's predictor raises (item 2 is in its shard): both ranks stop with that error, none waits."""
    got = _run_sharded(write_coco(tmp_path), crash_on=2)
    message = "benchmark failed: rank 1: RuntimeError: predictor crashed on item 2"
    assert got == {0: message, 1: message}


# ------------------------------------------------------------------------------------------------ CLI

@pytest.fixture
def no_model(monkeypatch):
    """Fail if the CLI tries to load a model."""
    import vllm2.cli.bench as cli

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the files were checked")

    monkeypatch.setattr(cli, "load_model", refuse)


def test_cli_missing_data_file(tmp_path, capsys, no_model):
    from vllm2.cli.bench import main

    missing = tmp_path / "missing.json"
    assert main(["det", "--config", "tiny", "--data", str(missing), "--out", str(tmp_path / "r.json")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_cli_missing_image_fails_before_compute(tmp_path, capsys, no_model):
    from vllm2.cli.bench import main

    path = write_coco(tmp_path, missing_image=True)
    assert main(["det", "--config", "tiny", "--data", str(path), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "nope.png" in err and "images[2]" in err


def test_cli_refuses_teacher_forced_text_task(tmp_path, capsys, no_model):
    from vllm2.cli.bench import main

    path = _write_jsonl(tmp_path / "vqa.jsonl", [{"image": write_images(tmp_path, 1)[0], "question": "q?",
                                                  "answers": ["a"]}])
    assert main(["vqa", "--config", "tiny", "--data", str(path), "--mode", "teacher-forced"]) == 2
    assert "routed mode only" in capsys.readouterr().err


def test_cli_nproc_relaunches_with_torchrun(tmp_path, monkeypatch):
    import vllm2.cli.bench as cli

    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["det", "--config", "tiny", "a.b=1", "--data", "x.json", "--nproc", "2"]
    assert cli.main(argv) == 0
    cmd, env = calls[0]
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vllm2.cli", "bench"]
    assert json.loads(env[cli.ARGV_ENV]) == argv


def _force_answers(monkeypatch, texts: list[str]) -> None:
    """Make ``model.chat`` write ``texts[b]`` (route tokens included) as the answer of batch row ``b``: the words are
    forced, everything after them (query states, decoders, parsing, scoring) runs for real."""
    from test_chat import Force
    from vllm2.modeling import VisionLLMv2Model

    chat = VisionLLMv2Model.chat

    def forced(self, processor, *args, **kwargs):
        tok = processor.tokenizer
        plans = {b: tok.encode(text, add_special_tokens=False) for b, text in enumerate(texts)}
        return chat(self, processor, *args, logits_processor=Force(plans, tok.eos_token_id), **kwargs)

    monkeypatch.setattr(VisionLLMv2Model, "chat", forced)


def _predict_in_order(monkeypatch, decoder_cls: type, results: list, num_groups: int) -> dict:
    """Make ``decoder_cls.predict`` return ``results`` in call order, one per sample row, after checking that each row
    holds ``num_groups`` real query groups. Returns what it saw: the results left and the options of each call."""
    seen: dict = {"left": list(results), "options": []}

    def predict(self, queries, query_mask, inputs, route_ids=None, **options):
        assert query_mask.sum(1).tolist() == [num_groups] * len(queries)
        seen["options"].append(options)
        return [seen["left"].pop(0) for _ in range(len(queries))]

    monkeypatch.setattr(decoder_cls, "predict", predict)
    return seen


def test_cli_vqa_routed_end_to_end(tmp_path, monkeypatch):
    """Forced answers "box" (right), "circle" (wrong) and a routed answer (a miss): accuracy and routing accuracy as
    the metric computes them on those texts."""
    from vllm2 import build_model, load_config
    from vllm2.cli.bench import main

    names = write_images(tmp_path, 4)
    path = _write_jsonl(tmp_path / "vqa.jsonl", [{"image": n, "question": "What is it?", "answers": ["box"] * 10}
                                                 for n in names])
    _force_answers(monkeypatch, [" box", " circle", " it[DET]"])
    out = tmp_path / "result.json"
    rc = main(["vqa", "--config", "tiny", "--data", str(path), "--limit", "3", "--batch-size", "3",
               "--max-new-tokens", "12", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["task"] == "vqa" and result["mode"] == "routed" and result["num_samples"] == 3
    assert result["metrics"]["accuracy"] == pytest.approx(vqa_accuracy(["box", "circle", ""], [["box"] * 10] * 3))
    assert result["metrics"]["accuracy"] == pytest.approx(1 / 3) and result["routing_accuracy"] == pytest.approx(2 / 3)
    assert result["decoder_errors"] == result["unconfigured_routes"] == {"count": 0, "first": []}
    assert result["data"]["split"] == "vqa" and result["data"]["files"]["annotations"] == str(path.resolve())
    assert result["data"]["limit"] == 3 and result["run"]["strict"] is False
    assert result["model"]["untrained"] and result["config"]["llm"]["hidden_size"] == 64
    torch.manual_seed(0)
    assert result["model"]["weights_sha256"] == runner.state_dict_sha256(build_model(load_config("tiny")))


@pytest.mark.parametrize("failure", ["raises", "unconfigured"])
def test_cli_decoder_failure_shows_in_the_result_and_fails_strict(tmp_path, monkeypatch, failure):
    """Every answer routes to [DET]; its decoder raises (or is not configured). The result counts each sample in
    ``decoder_errors`` (``unconfigured_routes``) and scores it as a miss; ``--strict`` stops with the error."""
    from decoders.gdino import GroundingDinoDecoder
    from vllm2.cli.bench import main

    path = write_coco(tmp_path)
    _, dataset = _dataset("det", path)
    _force_answers(monkeypatch, [" cat[DET]"] * 3)
    config = ["--config", "tiny"]
    if failure == "raises":
        def broken(*args, **kwargs):
            raise RuntimeError("out of memory")

        monkeypatch.setattr(GroundingDinoDecoder, "predict", broken)
        message, error = "decoder 'gdino' failed: out of memory", RuntimeError
    else:
        config.append("decoders.gdino=null")
        message, error = "no decoder 'gdino' is configured for the route [DET]", ValueError
    args = ["det", *config, "--data", str(path), "--batch-size", "3", "--max-new-tokens", "8", "--device", "cpu"]
    out = tmp_path / "result.json"
    assert main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    counted, clean = ("decoder_errors", "unconfigured_routes")[:: 1 if failure == "raises" else -1]
    assert result[counted] == {"count": 3, "first": [f"{dataset[i].source}: {message}" for i in range(3)]}
    assert result[clean] == {"count": 0, "first": []}
    assert result["routing_accuracy"] == 1.0
    assert result["metrics"]["bbox"] == coco_eval(str(path), [], "bbox", image_ids=[10, 11, 12])  # all misses
    strict = tmp_path / "strict.json"
    with pytest.raises(error, match=re.escape(message.split("failed: ")[-1])):  # the decoder's own exception
        main([*args, "--out", str(strict), "--strict"])
    assert not strict.exists()


def test_cli_pose_teacher_forced_with_model_folder(tmp_path, monkeypatch):
    """A saved model folder, teacher-forced: the keypoint decoder answers with known keypoints on the real query
    groups (1 object + 3 keypoint groups per sample); AP and PCK are those of pycocotools and PCK on them."""
    from decoders.keypoint import KeypointDecoder
    from vllm2 import VisionLLMv2Processor, build_model, load_config
    from vllm2.cli.bench import main

    cfg = load_config("tiny", ["decoders.gdino=null"])
    torch.manual_seed(0)
    folder = tmp_path / "model"
    build_model(cfg).save_pretrained(folder)
    VisionLLMv2Processor.from_config(cfg).save_pretrained(folder)
    path = write_keypoints(tmp_path)
    _, dataset = _dataset("pose", path, "teacher_forced")
    answers = [_pose_prediction(i, dataset[i].targets["keypoint"], False)[0].outputs["keypoint"].result
               for i in range(2)]
    seen = _predict_in_order(monkeypatch, KeypointDecoder, answers, num_groups=4)
    out = tmp_path / "pose.json"
    assert main(["pose", "--model", str(folder), "--data", str(path), "--mode", "teacher-forced",
                 "--batch-size", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert seen == {"left": [], "options": [{}]}
    result = json.loads(out.read_text())
    assert result["mode"] == "teacher-forced" and result["num_samples"] == 2 and "routing_accuracy" not in result
    keypoints, pck_value = _pose_expected(path, dataset, False, 0.2)
    assert result["metrics"]["keypoints"] == keypoints and 0 < keypoints["AP"] < 1
    assert result["metrics"]["PCK@0.2"] == pytest.approx(pck_value)
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    assert result["model"]["weights_sha256"] == digest.hexdigest()
    assert result["model"]["folder"] == str(folder)


@pytest.mark.parametrize("name", ["det", "res"])
def test_cli_gdino_tasks_teacher_forced_end_to_end(tmp_path, monkeypatch, name):
    """Teacher-forced det / res through the tiny model, GroundingDINO answering with known boxes (and masks) on the
    real query groups: the metrics are those the metric functions give on them."""
    from decoders.gdino import GroundingDinoDecoder
    from vllm2.cli.bench import main

    path = write_coco(tmp_path) if name == "det" else write_refcoco(tmp_path)
    task, dataset = _dataset(name, path, "teacher_forced")
    if name == "det":
        answers = [_det_prediction(i, dataset[i].targets["gdino"], False).outputs["gdino"].result for i in range(3)]
    else:
        answers = [_grd_prediction(k, dataset[k].targets["gdino"]).outputs["gdino"].result for k in range(4)]
    seen = _predict_in_order(monkeypatch, GroundingDinoDecoder, answers, num_groups=2 if name == "det" else 1)
    out = tmp_path / f"{name}.json"
    assert main([name, "--config", "tiny", "--data", str(path), "--mode", "teacher-forced", "--batch-size", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert seen["left"] == [] and seen["options"] == [task.decoder_options()["gdino"]] * 2
    metrics = json.loads(out.read_text())["metrics"]
    if name == "det":
        assert metrics == {"bbox": _det_expected(path, dataset, False, [0, 1, 2])}
    else:
        boxes = [a["boxes"][0] for a in answers]
        masks = [a["masks"][0] for a in answers]
        targets = [dataset[k].targets["gdino"] for k in range(4)]
        assert metrics["Acc@0.5"] == rec_accuracy(boxes, [t["boxes"][0] for t in targets]) == 0.75
        expected = res_iou(masks, [t["masks"][0] for t in targets])
        assert metrics["cIoU"] == pytest.approx(expected["cIoU"]) and metrics["mIoU"] == pytest.approx(expected["mIoU"])


SHAPES_MODEL = REPO / "data" / "shapes-model"


@pytest.mark.parametrize("name, mode", [("det", "routed"), ("pose", "teacher-forced")])
def test_cli_sharded_equals_single_on_a_model_that_routes(tmp_path, name, mode):
    """`vllm2 bench det|pose` with the shipped shapes-world model on 4 held-out items: with --nproc 2 (torchrun,
    gloo) the merged result equals the single-process one, which is a real score (the model writes the task's
    routes itself in routed mode)."""
    import os
    import subprocess
    import sys

    from vllm2 import shapes
    from vllm2.cli.bench import main

    shapes.write_dataset(tmp_path / "world", n=4, seed=11)
    path = tmp_path / "world" / ("instances.json" if name == "det" else "keypoints.json")
    args = [name, "--model", str(SHAPES_MODEL), "--data", str(path), "--mode", mode, "--batch-size", "2",
            "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "single.json")]) == 0
    single = json.loads((tmp_path / "single.json").read_text())
    assert single["num_samples"] == 4 and single["decoder_errors"]["count"] == 0
    metric = single["metrics"]["bbox" if name == "det" else "keypoints"]["AP"]
    assert metric > 0  # a real score, not the -1 / 0 of no detections
    if mode == "routed":
        assert single["routing_accuracy"] == 1.0  # MODEL-DEPENDENT: the shipped model routes these items right
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "vllm2.cli", "bench", *args, "--nproc", "2",
                           "--out", str(tmp_path / "sharded.json")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sharded = json.loads((tmp_path / "sharded.json").read_text())
    assert sharded["run"]["nproc"] == 2 and single["run"]["nproc"] == 1
    keys = ("metrics", "num_samples", "routing_accuracy", "misrouted", "decoder_errors", "unconfigured_routes")
    assert {k: sharded.get(k) for k in keys} == {k: single.get(k) for k in keys}
    assert sharded["model"]["weights_sha256"] == single["model"]["weights_sha256"]
