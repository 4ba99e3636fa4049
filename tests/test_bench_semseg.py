"""``vllm2 bench semseg``: the ADE20K-layout reader (prompts, targets, clear errors for bad folders), dispatch with a
fake predictor (routed phrases mapped by name, misses and decoder errors counted, metrics equal the metric functions
on the painted label maps), and the CLI end to end on the tiny model (teacher-forced)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image
from superlink import RouteTable
from vllm2.bench import runner
from vllm2.bench.metrics_semseg import semseg_counts, semseg_metrics
from vllm2.bench.tasks import DecoderPrediction, SamplePrediction, TaskOptions, build_task
from vllm2.data.records import RecordError
from vllm2.data.templates import Templates

ROUTES = RouteTable.default()
W, H = 40, 32
CLASSES = ["background", "cat", "traffic_light", "tree"]  # "tree" never occurs


def _labels(k: int) -> np.ndarray:
    """Item k's label map: cat on the left, traffic light on the right (item 1: none), an ignored stripe."""
    label = np.zeros((H, W), dtype=np.uint8)
    label[4:20, 2:14] = 1
    if k != 1:
        label[10:30, 24:36] = 2
    label[-2:] = 255
    return label


def write_semseg(folder: Path, count: int = 3, classes: list[str] = CLASSES) -> Path:
    """A semseg folder: ``count`` images ``img{k}.png`` with label maps :func:`_labels` and ``classes.txt``."""
    for sub in ("images", "annotations"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for k in range(count):
        make_image(W, H, seed=k).save(folder / "images" / f"img{k}.png")
        Image.fromarray(_labels(k)).save(folder / "annotations" / f"img{k}.png")
    (folder / "classes.txt").write_text("\n".join(classes) + "\n")
    return folder


def _dataset(path: Path, mode: str = "question", options: TaskOptions | None = None):
    task = build_task("semseg", options).bind(ROUTES)
    return task, task.build_dataset(path, None, Templates(ROUTES), mode)


# ------------------------------------------------------------------------------------------------ reader

def test_reader_prompts_every_class_and_targets_the_label_map(tmp_path):
    task, dataset = _dataset(write_semseg(tmp_path), "teacher_forced")
    assert task.expected_routes() == ("[SEG]",) and task.decoder() == "gdino"
    assert len(dataset) == 3 and dataset.classes == ["background", "cat", "traffic light", "tree"]
    sample = dataset[0]
    question, answer = sample.turns[0][1], sample.turns[1][1]
    assert "cat, traffic light, tree" in question and "background" not in question
    suffix = ROUTES.answer_suffix("[SEG]")
    assert f"cat{suffix}, traffic light{suffix}, tree{suffix}" in answer
    target = sample.targets["gdino"]
    assert target["labels"].tolist() == [0, 1]  # group index = class - 1
    assert (target["masks"] == np.stack([_labels(0) == 1, _labels(0) == 2])).all()
    assert dataset[1].targets["gdino"]["labels"].tolist() == [0]
    assert dataset.label_map(2).tolist() == _labels(2).tolist()
    _, question_only = _dataset(tmp_path)
    assert [role for role, _ in question_only[0].turns] == ["user"]


def _broken(tmp_path: Path, name: str) -> Path:
    folder = write_semseg(tmp_path / name, count=2)
    if name == "no_classes":
        (folder / "classes.txt").unlink()
    elif name == "wrong_size":
        Image.fromarray(np.zeros((H, W + 1), dtype=np.uint8)).save(folder / "annotations" / "img1.png")
    elif name == "beyond_classes":
        Image.fromarray(np.full((H, W), 4, dtype=np.uint8)).save(folder / "annotations" / "img1.png")
    elif name == "rgb_label":
        Image.new("RGB", (W, H)).save(folder / "annotations" / "img1.png")
    elif name == "no_label":
        (folder / "annotations" / "img1.png").unlink()
    elif name == "duplicate_class":
        (folder / "classes.txt").write_text("background\ncat\nCat\n")
    return folder


@pytest.mark.parametrize("name, message", [
    ("no_classes", "classes.txt' does not exist"),
    ("duplicate_class", "classes 1 and 2 have the same name"),
    ("wrong_size", "annotations/img1.png' is 41x32 but its image is 40x32"),
    ("beyond_classes", "annotations/img1.png' has value 4, beyond the 4 classes"),
    ("rgb_label", "annotations/img1.png' is a 'RGB' image"),
    ("no_label", "annotations/img1.png' of image 'img1.png' does not exist"),
])
def test_reader_errors_name_the_file(tmp_path, name, message):
    folder = _broken(tmp_path, name)
    with pytest.raises((ValueError, OSError)) as info:
        _, dataset = _dataset(folder)
        runner.check_samples(dataset, range(len(dataset)))
    assert message in str(info.value)
    if isinstance(info.value, RecordError):
        assert "img1.png" in info.value.source


# ------------------------------------------------------------------------------------------------ dispatch

def _masks_of(label: np.ndarray, classes: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.stack([label == c for c in classes]))


def _prediction(k: int, routed: bool) -> SamplePrediction:
    """Item 0: both classes exact plus a low-scoring stray mask; routed phrases in another order with an unknown
    one. Routed item 1: a wrong route (a miss); routed item 2: a decoder error (a miss)."""
    label = _labels(k)
    masks = _masks_of(label, [1, 2])  # [2, H, W]
    stray = torch.zeros(1, H, W, dtype=torch.bool)
    stray[0, :8, :] = True  # a tree over the top rows; it loses where the cat scores higher
    result = {"masks": torch.cat([masks, stray]), "scores": torch.tensor([0.9, 0.8, 0.3]),
              "labels": torch.tensor([0, 1, 2])}
    phrases, groups = None, ["[SEG]"] * 3
    if routed:
        phrases = ["cat", "Traffic-light", "tree", "zebra"]  # group order = phrase order; "zebra" names nothing
        groups = ["[SEG]"] * 4
    out = DecoderPrediction(groups, phrases, result)
    if routed and k == 2:
        out = DecoderPrediction(groups, phrases, None, "decoder 'gdino' failed: boom")
    routes = ["[DET]"] if routed and k == 1 else ["[SEG]"] * len(groups)
    return SamplePrediction("", routes, {"gdino": out})


def _painted(k: int) -> np.ndarray:
    """The label map the dispatch must paint from :func:`_prediction` (routed = teacher-forced here)."""
    label = np.where(_labels(k) == 255, 0, _labels(k)).astype(np.int64)
    top = label[:8] == 0
    label[:8][top] = 3
    return label


@pytest.mark.parametrize("routed", [True, False])
def test_dispatch_counts_and_metrics(tmp_path, routed):
    task, dataset = _dataset(write_semseg(tmp_path), "question" if routed else "teacher_forced")

    def predict(samples):
        return [_prediction(int(Path(s.source).stem[3:]), routed) for s in samples]

    got = runner.evaluate(task, dataset, predict, "routed" if routed else "teacher-forced", batch_size=2)
    maps = [_painted(k) if not routed or k == 0 else np.zeros((H, W), dtype=np.int64) for k in range(3)]
    expected = semseg_metrics(*zip(*[semseg_counts(m, _labels(k), 4) for k, m in enumerate(maps)]),
                              ["background", "cat", "traffic light", "tree"])
    metrics = got["metrics"]
    assert {k: metrics[k] for k in expected} == expected
    assert 0 < metrics["mIoU"] < 1 and metrics["IoU"]["tree"] == 0.0 and metrics["reduce_zero_label"] is False
    assert got["num_samples"] == 3
    if routed:
        assert got["routing_accuracy"] == pytest.approx(2 / 3)
        assert (metrics["missing"], metrics["unknown_phrases"]) == (2, 1)
        assert got["decoder_errors"] == {"count": 1, "first": [f"{dataset[2].source}: decoder 'gdino' failed: boom"]}
    else:
        assert "routing_accuracy" not in got
        assert (metrics["missing"], metrics["unknown_phrases"], got["decoder_errors"]["count"]) == (0, 0, 0)
        assert metrics["IoU"]["cat"] == 1.0 and metrics["IoU"]["traffic light"] == 1.0
    assert task.decoder_options() == {"gdino": {"mode": "det", "return_masks": True, "score_threshold": 0.1}}


def test_dispatch_reduce_zero_label(tmp_path):
    task, dataset = _dataset(write_semseg(tmp_path), "teacher_forced", TaskOptions(reduce_zero_label=True))

    def predict(samples):
        return [_prediction(0, False) for _ in samples]  # item 0's answer everywhere

    metrics = runner.evaluate(task, dataset, predict, "teacher-forced", batch_size=3)["metrics"]
    assert "background" not in metrics["IoU"] and metrics["reduce_zero_label"] is True
    # cat exact everywhere; traffic light predicted on item 1 (no traffic light there) but its pixels are background,
    # which is ignored; the stray tree covers only background pixels (ignored) and a top strip of no other class
    assert metrics["IoU"] == pytest.approx({"cat": 1.0, "traffic light": 1.0, "tree": None})
    assert metrics["mIoU"] == pytest.approx(1.0) and metrics["aAcc"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_semseg_missing_folder_fails_before_the_model(tmp_path, capsys, monkeypatch):
    import vllm2.cli.bench as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    missing = tmp_path / "nowhere"
    assert cli.main(["semseg", "--config", "tiny", "--data", str(missing), "--out", str(tmp_path / "r.json")]) == 2
    assert str(missing) in capsys.readouterr().err
    folder = _broken(tmp_path, "beyond_classes")
    assert cli.main(["semseg", "--config", "tiny", "--data", str(folder), "--out", str(tmp_path / "r.json")]) == 2
    assert "has value 4, beyond the 4 classes" in capsys.readouterr().err


def test_cli_semseg_teacher_forced_end_to_end(tmp_path):
    from vllm2.cli.bench import main

    folder = write_semseg(tmp_path / "data", count=2)
    out = tmp_path / "semseg.json"
    assert main(["semseg", "--config", "tiny", "--data", str(folder), "--mode", "teacher-forced", "--batch-size", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert (result["task"], result["mode"], result["num_samples"]) == ("semseg", "teacher-forced", 2)
    assert "routing_accuracy" not in result
    metrics = result["metrics"]
    assert set(metrics["IoU"]) == set(metrics["Acc"]) == {"background", "cat", "traffic light", "tree"}
    assert 0 <= metrics["mIoU"] <= 1 and 0 <= metrics["aAcc"] <= 1 and 0 <= metrics["mAcc"] <= 1
    assert (metrics["missing"], metrics["unknown_phrases"], result["decoder_errors"]["count"]) == (0, 0, 0)
    assert result["data"]["files"] == {"annotations": str(folder.resolve()),
                                       "image_root": str((folder / "images").resolve())}
    assert result["data"]["split"] == "data" and result["model"]["untrained"]
