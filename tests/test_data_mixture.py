"""The dataset mixture: YAML config, ratios and weights, determinism, evaluation modes, bad records, config errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_data_annotations import EXAMPLES, IMAGES
from vllm2 import load_config
from vllm2.data import EditDataset, Mixture, RecordError, TaskSample, Templates, TextToImageDataset, build_mixture

MIXTURE = EXAMPLES / "mixture.yaml"


def _config(*overrides):
    return load_config(MIXTURE, [f"data.root={EXAMPLES}", *overrides])


def _rendered(mixture):
    return [(s.task, tuple(s.turns), s.source) for s in (mixture[i] for i in range(len(mixture)))]


@pytest.fixture(scope="module")
def cfg():
    return _config()


def test_example_mixture_lengths_and_tasks(cfg):
    mixture = build_mixture(cfg, cfg.route_table())
    # llava 4, instance_seg 2 x2.0, interactive 2 x0.5, refcoco 2, keypoints 1 x3.0, regions 4, t2i 2, edit 2
    assert len(mixture) == 4 + 4 + 1 + 2 + 3 + 4 + 2 + 2
    assert mixture.tasks.count("instance_seg") == 4 and mixture.tasks.count("pose") == 3
    assert mixture.tasks.count("region_caption") == 2 and mixture.tasks.count("region_vqa") == 2
    samples = [mixture[i] for i in range(len(mixture))]
    assert all(isinstance(s, TaskSample) for s in samples)
    assert [s.task for s in samples] == mixture.tasks
    pose = [s for s in samples if s.task == "pose"]
    assert {s.source for s in pose} == {pose[0].source}  # one record, three copies...
    assert len({tuple(s.turns) for s in pose}) > 1  # ...rendered with their own generators


def test_mixture_is_deterministic_given_the_seed(cfg):
    routes = cfg.route_table()
    first, again = build_mixture(cfg, routes), build_mixture(cfg, routes)
    assert _rendered(first) == _rendered(again)
    other = build_mixture(_config("data.seed=5"), routes)
    assert _rendered(other) != _rendered(first)
    before = _rendered(first)
    first.set_epoch(1)
    assert _rendered(first) != before


def test_ratio_subsamples_and_weights_share_the_length(cfg):
    templates = Templates(cfg.route_table())
    t2i = TextToImageDataset(EXAMPLES / "t2i.jsonl", IMAGES, templates=templates)
    edit = EditDataset(EXAMPLES / "edit.jsonl", IMAGES, templates=templates)
    half = Mixture([t2i], ratios=[0.5], seed=3)
    assert len(half) == 1 and np.array_equal(half.local_index, Mixture([t2i], ratios=[0.5], seed=3).local_index)
    picks = {int(Mixture([t2i], ratios=[0.5], seed=s).local_index[0]) for s in range(20)}
    assert picks == {0, 1}  # a seeded random subset
    oversampled = Mixture([t2i], ratios=[2.5], seed=0)
    assert len(oversampled) == 5 and sorted(oversampled.local_index.tolist()).count(0) >= 2
    weighted = Mixture([t2i, edit], weights=[3.0, 1.0], seed=0)
    assert len(weighted) == 4 and weighted.dataset_index.tolist().count(0) == 3
    with pytest.raises(ValueError, match="ratios or weights"):
        Mixture([t2i], ratios=[1.0], weights=[1.0])
    with pytest.raises(ValueError, match="leaves no items"):
        Mixture([t2i], ratios=[0.1])


def test_evaluation_mode_uses_first_phrasings(cfg):
    mixture = build_mixture(cfg, cfg.route_table(), mode="teacher_forced")
    samples = [mixture[i] for i in range(len(mixture))]
    det = [s for s in samples if s.task == "instance_seg"]
    assert all(s.turns[0][1].endswith("identify the red square, blue circle, green triangle, yellow star present?")
               for s in det)
    assert mixture.tasks.count("res") == 3  # one item per expression
    questions = build_mixture(cfg, cfg.route_table(), mode="question")
    assert all(len(questions[i].turns) == 1 for i in range(len(questions)) if questions.tasks[i] != "chat")


def test_bad_records_are_skipped_counted_and_reported(tmp_path):
    bad = tmp_path / "t2i.jsonl"
    bad.write_text((EXAMPLES / "t2i.jsonl").read_text() + json.dumps({"image": "missing.png", "caption": "x"}) + "\n")
    data = {"datasets": [{"type": "t2i", "path": str(bad), "image_root": str(IMAGES), "ratio": 2.0},
                         {"type": "edit", "path": str(EXAMPLES / "edit.jsonl"), "image_root": str(IMAGES)}]}
    cfg = load_config("tiny")
    cfg.data = data
    with pytest.raises(RecordError, match=rf"{bad}\[2\].*missing.png"):
        [build_mixture(cfg, cfg.route_table())[i] for i in range(8)]
    cfg.training.skip_bad_records = True
    mixture = build_mixture(cfg, cfg.route_table())
    items = [mixture[i] for i in range(len(mixture))]
    assert len(items) == 8 and sum(item is None for item in items) == 2  # both copies of the bad record
    assert [b.source for b in mixture.bad_records] == [f"{bad}[2]"] and mixture.bad_count == 2
    assert "missing.png" in mixture.bad_records[0].reason and "skipped 1 bad records" in mixture.summary()


@pytest.mark.parametrize("data, message", [
    ({"datasets": [{"type": "nope", "path": "x"}]}, r"data.datasets\[0\].type: unknown dataset type 'nope'"),
    ({"datasets": [{"type": "t2i", "path": "t2i.jsonl", "tasks": "det"}]}, r"data.datasets\[0\]: unknown key"),
    ({"datasets": [{"type": "t2i", "path": "t2i.jsonl", "ratio": 1, "weight": 1}]}, "ratio or weight, not both"),
    ({"datasets": [{"type": "t2i", "path": "t2i.jsonl", "weight": 1}, {"type": "edit", "path": "edit.jsonl"}]},
     "every dataset needs one"),
    ({"datasets": []}, "non-empty list"),
    ({"datasets": [{"type": "t2i"}]}, r"data.datasets\[0\].path"),
    ({"dataset": []}, "unknown key"),
    ({"datasets": [{"type": "t2i", "path": "t2i.jsonl"}], "templates": {"max_cats": 3}}, "data.templates"),
    ({"datasets": [{"type": "coco", "path": "coco_instances.json", "task": "pose"}]}, "unknown task 'pose'"),
])
def test_config_errors_name_the_key(data, message):
    cfg = load_config("tiny")
    cfg.data = {"root": str(EXAMPLES), **{k: v for k, v in data.items()}}
    with pytest.raises((KeyError, ValueError), match=message):
        build_mixture(cfg, cfg.route_table())


def test_two_loader_workers_give_the_batches_of_none(cfg):
    from torch.utils.data import DataLoader

    from vllm2 import VisionLLMv2Processor
    from vllm2.data import Collator
    from vllm2.training import TaskAlignedBatchSampler, training_arguments

    tiny = load_config("tiny", ["training.dataloader_num_workers=2"])
    assert training_arguments(tiny).dataloader_num_workers == 2
    processor = VisionLLMv2Processor.from_config(tiny)
    mixture = build_mixture(cfg, processor.routes)
    sampler = TaskAlignedBatchSampler(mixture.tasks, 3, 1, 0, seed=0)
    loaders = [DataLoader(mixture, batch_sampler=sampler, collate_fn=Collator(processor, 1024), num_workers=n)
               for n in (0, 2)]
    batches = [list(loader) for loader in loaders]
    assert len(batches[0]) == len(batches[1]) > 1
    assert all(_same(dict(a), dict(b)) for a, b in zip(*batches))


def _same(a, b) -> bool:
    """Equal nested batches: tensors and arrays element for element, images pixel for pixel."""
    import torch
    from PIL import Image

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, Image.Image):
        return isinstance(b, Image.Image) and (a.mode, a.size, a.tobytes()) == (b.mode, b.size, b.tobytes())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
