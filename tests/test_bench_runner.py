"""Benchmark runner: metric dispatch with fake predictors (routed and teacher-forced) equals the metric functions
called directly; routing misses; sharded runs (gloo) equal one process; the CLI checks files before any compute,
hashes weights and writes the result JSON."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import socket
from pathlib import Path

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
    expected_records = []
    for i in range(3):
        if routed and i == 1:
            continue
        sample = dataset[i]
        expected_records += _coco_records(i, 10 + i, _det_prediction(i, sample.targets["gdino"], routed), routed)
    expected = coco_eval(str(path), expected_records, "bbox", image_ids=[10, 11, 12])
    assert got["metrics"]["bbox"] == expected
    assert 0 < expected["AP"] < 1
    assert got["num_samples"] == 3
    if routed:
        assert got["routing_accuracy"] == pytest.approx(2 / 3)
    else:
        assert "routing_accuracy" not in got


def test_seg_dispatch_reports_bbox_and_segm(tmp_path):
    path = write_coco(tmp_path)
    task, dataset = _dataset("seg", path)
    assert task.decoder_options() == {"gdino": {"mode": "det", "return_masks": True}}

    def predict(samples):
        return [_det_prediction(_image_position(s), s.targets["gdino"], True, with_masks=True) for s in samples]

    got = runner.evaluate(task, dataset, predict, "routed", batch_size=1)["metrics"]
    assert set(got) == {"bbox", "segm"} and 0 < got["segm"]["AP"] < 1


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
    assert got["metrics"]["keypoints"] == coco_eval(str(path), records, "keypoints")
    assert 0 < got["metrics"]["keypoints"]["AP"] < 1
    assert got["metrics"]["PCK@0.1"] == pytest.approx(pck(tops, gts, boxes, 0.1))


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
    parts = [[(i, True, {"v": i}) for i in block] for block in reversed(blocks)]
    assert [r[0] for r in runner.merge_records(parts)] == list(range(7))
    with pytest.raises(ValueError, match="item 2"):
        runner.merge_records([[(2, True, {})], [(2, True, {})]])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sharded_worker(rank: int, world: int, port: int, path: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    task, dataset = _dataset("det", Path(path))

    def predict(samples):
        return [_det_prediction(_image_position(s), s.targets["gdino"], True) for s in samples]

    summary = runner.evaluate_sharded(task, dataset, predict, "routed", batch_size=2)
    if rank == 0:
        queue.put(summary)
    dist.barrier()
    dist.destroy_process_group()


def test_sharded_run_equals_single_process(tmp_path):
    path = write_coco(tmp_path)
    task, dataset = _dataset("det", path)

    def predict(samples):
        return [_det_prediction(_image_position(s), s.targets["gdino"], True) for s in samples]

    single = runner.evaluate(task, dataset, predict, "routed", batch_size=2)
    ctx = mp.get_context("fork")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_sharded_worker, args=(r, 2, port, str(path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    sharded = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sharded == single and 0 < single["metrics"]["bbox"]["AP"] < 1


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


def test_cli_vqa_routed_end_to_end(tmp_path, capsys):
    from vllm2 import build_model, load_config
    from vllm2.cli.bench import main

    names = write_images(tmp_path, 3)
    path = _write_jsonl(tmp_path / "vqa.jsonl", [{"image": n, "question": "What is it?", "answers": ["box"] * 10}
                                                 for n in names])
    out = tmp_path / "result.json"
    rc = main(["vqa", "--config", "tiny", "--data", str(path), "--limit", "2", "--batch-size", "2",
               "--max-new-tokens", "3", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["task"] == "vqa" and result["mode"] == "routed" and result["num_samples"] == 2
    assert 0 <= result["metrics"]["accuracy"] <= 1 and 0 <= result["routing_accuracy"] <= 1
    assert result["data"]["split"] == "vqa" and result["data"]["files"]["annotations"] == str(path.resolve())
    assert result["model"]["untrained"] and result["config"]["llm"]["hidden_size"] == 64
    torch.manual_seed(0)
    assert result["model"]["weights_sha256"] == runner.state_dict_sha256(build_model(load_config("tiny")))


def test_cli_pose_teacher_forced_with_model_folder(tmp_path):
    from vllm2 import VisionLLMv2Processor, build_model, load_config
    from vllm2.cli.bench import main

    cfg = load_config("tiny", ["decoders.gdino=null"])
    torch.manual_seed(0)
    folder = tmp_path / "model"
    build_model(cfg).save_pretrained(folder)
    VisionLLMv2Processor.from_config(cfg).save_pretrained(folder)
    path = write_keypoints(tmp_path)
    out = tmp_path / "pose.json"
    assert main(["pose", "--model", str(folder), "--data", str(path), "--mode", "teacher-forced",
                 "--batch-size", "2", "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "teacher-forced" and result["num_samples"] == 2
    assert -1 <= result["metrics"]["keypoints"]["AP"] <= 1 and "PCK@0.2" in result["metrics"]
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    assert result["model"]["weights_sha256"] == digest.hexdigest()
    assert result["model"]["folder"] == str(folder)


@pytest.mark.parametrize("name", ["det", "res"])
def test_cli_gdino_tasks_teacher_forced_end_to_end(tmp_path, name):
    from vllm2.cli.bench import main

    path = write_coco(tmp_path) if name == "det" else write_refcoco(tmp_path)
    out = tmp_path / f"{name}.json"
    assert main([name, "--config", "tiny", "--data", str(path), "--mode", "teacher-forced", "--batch-size", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    if name == "det":
        assert set(metrics) == {"bbox"} and 0 <= metrics["bbox"]["AP"] <= 1
    else:
        assert 0 <= metrics["cIoU"] <= 1 and 0 <= metrics["Acc@0.5"] <= 1


@pytest.mark.parametrize("name, mode", [("det", "routed"), ("det", "teacher-forced"), ("pose", "routed"),
                                        ("pose", "teacher-forced")])
def test_cli_det_and_pose_both_modes_sharded_equals_single(tmp_path, name, mode):
    """`vllm2 bench det|pose` on the tiny config in both modes; with --nproc 2 (torchrun, gloo) for one mode each,
    the merged result equals the single-process one."""
    import os
    import subprocess
    import sys

    from vllm2.cli.bench import main

    path = write_coco(tmp_path) if name == "det" else write_keypoints(tmp_path)
    args = [name, "--config", "tiny", "--data", str(path), "--mode", mode, "--batch-size", "2", "--device", "cpu",
            "--max-new-tokens", "8"]
    assert main([*args, "--out", str(tmp_path / "single.json")]) == 0
    single = json.loads((tmp_path / "single.json").read_text())
    assert single["mode"] == mode and single["num_samples"] >= 2
    assert ("routing_accuracy" in single) == (mode == "routed")
    if (name, mode) not in {("det", "teacher-forced"), ("pose", "routed")}:
        return
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "vllm2.cli", "bench", *args, "--nproc", "2",
                           "--out", str(tmp_path / "sharded.json")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sharded = json.loads((tmp_path / "sharded.json").read_text())
    assert sharded["run"]["nproc"] == 2
    assert sharded["metrics"] == single["metrics"] and sharded["num_samples"] == single["num_samples"]
    assert sharded.get("routing_accuracy") == single.get("routing_accuracy")
    assert sharded["model"]["weights_sha256"] == single["model"]["weights_sha256"]
