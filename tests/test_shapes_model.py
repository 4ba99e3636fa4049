"""The shipped shapes-world model (``data/shapes-model``, the embedded default of ``make demo``): it loads with the
current code, was built from ``configs/shapes.yaml``, and answers the demo prompts through the right routes with
results that match the demo images' ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vllm2 import VisionLLMv2Processor, load_config, shapes
from vllm2.bench.runner import routes_in_text
from vllm2.cli.chat import read_batch
from vllm2.config import config_to_dict
from vllm2.data.annotations import mask_to_box
from vllm2.modeling import VisionLLMv2Model

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "data" / "shapes-model"
DEMO = REPO / "data" / "samples" / "demo.json"


@pytest.fixture(scope="module")
def shipped():
    model = VisionLLMv2Model.from_pretrained(MODEL).eval()
    return model, VisionLLMv2Processor.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def answers(shipped):
    model, processor = shipped
    items = read_batch(str(DEMO))
    results = model.chat(processor, [path for path, _, _ in items], [prompt for _, prompt, _ in items],
                         max_new_tokens=128)
    return {label: result for (_, _, label), result in zip(items, results)}


def test_built_from_the_recipe(shipped):
    model, _ = shipped
    recipe = load_config(REPO / "configs" / "shapes.yaml")
    for section in ("vision", "region", "bridge", "llm", "superlink", "decoders"):
        assert config_to_dict(getattr(model.cfg, section)) == config_to_dict(getattr(recipe, section)), section
    assert all(p.dtype == torch.float32 for p in model.parameters())


def _iou(a, b) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_demo_prompts_take_their_routes(shipped, answers):
    routes = shipped[1].routes
    task = routes.route_for_task
    expected = {"describe": [], "count": [], "detect": [task("det")] * 3, "segment": [task("semantic_seg")] * 3,
                "find": [task("rec")], "draw": [task("t2i")], "edit": [task("edit")]}
    got = {k: routes_in_text(r.text, routes) for k, r in answers.items()}
    pose = got.pop("pose")
    assert got == expected
    assert pose[0] == task("det") and len(pose) > 1 and set(pose[1:]) == {task("pose")}
    assert all(o.error is None and o.result is not None for r in answers.values() for o in r.outputs)


def test_demo_answers_match_the_scene(answers):
    """The demo scene (seed 7): four shapes; the small red circle is found; at least two of the four shapes are
    detected with their category at score 0.3; the drawn triangle is blue."""
    scene = shapes.make_scene(np.random.default_rng([7, 0, 0]), 96)
    truth = [(s.kind, mask_to_box(m).tolist()) for s, m in zip(scene.shapes, scene.masks)]
    assert answers["count"].text.strip() == shapes.NUMBERS[len(truth)]

    (found,) = answers["find"].outputs
    circle = next(box for kind, box in truth if kind == "circle")
    assert _iou(found.result["boxes"][0].tolist(), circle) >= 0.5

    (det,) = answers["detect"].outputs
    keep = det.result["scores"] >= 0.3
    detections = [(det.phrases[int(label)], box.tolist())
                  for label, box in zip(det.result["labels"][keep], det.result["boxes"][keep])]
    hits = [any(k == kind and _iou(b, box) >= 0.5 for k, b in detections) for kind, box in truth]
    assert sum(hits) >= 2, (detections, truth)

    (drawn,) = answers["draw"].outputs
    assert shapes.dominant_colour(drawn.result) == "blue"
