"""The demo's sample files (data/samples: scene.png, figures.png, edit.png, demo.json) are what ``vllm2 data demo``
writes, and they are the first items of the held-out world (seed 1) with that world's own annotations as ground
truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm2.bench.judges import RULES
from vllm2.cli import main
from vllm2.data.templates import DEFAULT_PHRASINGS
from vllm2.shapes import DEMO_FILES, NUMBERS, write_dataset

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
TASKS = ["describe", "count", "detect", "segment", "find", "pose", "draw", "edit"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The first items of `vllm2 data shapes --seed 1 --gen-size 32` (the held-out world of make shapes-bench)."""
    root = tmp_path_factory.mktemp("world")
    write_dataset(root, 1, seed=1, size=96, gen_size=32)
    return root


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def test_shipped_files_are_what_the_generator_writes(tmp_path, capsys):
    assert main(["data", "demo", "--out", str(tmp_path)]) == 0
    assert "wrote 8 demo items" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(DEMO_FILES)
    for name in DEMO_FILES:
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), name
    assert json.loads((tmp_path / "demo.json").read_text()) == json.loads((SAMPLES / "demo.json").read_text())


def test_demo_items_are_the_first_items_of_the_held_out_world(world):
    assert (SAMPLES / "scene.png").read_bytes() == (world / "images/scenes/00000.png").read_bytes()
    assert (SAMPLES / "figures.png").read_bytes() == (world / "images/figures/00000.png").read_bytes()
    assert (SAMPLES / "edit.png").read_bytes() == (world / "images/edit/00000_in.png").read_bytes()

    items = json.loads((SAMPLES / "demo.json").read_text())
    assert [i["task"] for i in items] == TASKS and [i["expect"]["rule"] for i in items] == TASKS
    assert set(TASKS) == set(RULES)
    demo = {i["task"]: i for i in items}
    assert {i["image"] for i in items if i["task"] not in ("pose", "draw", "edit")} == {"scene.png"}
    assert (demo["pose"]["image"], demo["draw"]["image"], demo["edit"]["image"]) == ("figures.png", None, "edit.png")

    instances = json.loads((world / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    shapes = instances["annotations"]
    assert demo["describe"]["expect"]["caption"] == _lines(world / "captions_bench.jsonl")[0]["captions"][0]
    assert demo["count"]["expect"]["answer"] == NUMBERS[len(shapes)]
    assert [(o["category"], o["box"]) for o in demo["detect"]["expect"]["objects"]] == [
        (names[a["category_id"]], _xyxy(a["bbox"])) for a in shapes]
    assert [(o["category"], o["mask"]) for o in demo["segment"]["expect"]["objects"]] == [
        (names[a["category_id"]], a["segmentation"]) for a in shapes]

    find = demo["find"]["expect"]
    (ref,) = [r for r in _lines(world / "refcoco.jsonl") if find["expression"] in r["expressions"]]
    assert (find["box"], find["mask"]) == (_xyxy(ref["bbox"]), ref["segmentation"])
    assert demo["find"]["prompt"] == DEFAULT_PHRASINGS["grounding_question"][0].format(expression=find["expression"])

    keypoints = json.loads((world / "keypoints.json").read_text())
    figures = demo["pose"]["expect"]["figures"]
    assert [f["keypoints"] for f in figures] == [
        [a["keypoints"][k : k + 3] for k in range(0, len(a["keypoints"]), 3)] for a in keypoints["annotations"]]
    assert [f["box"] for f in figures] == [_xyxy(a["bbox"]) for a in keypoints["annotations"]]
    assert demo["pose"]["expect"]["keypoint_names"] == [
        k.replace("_", " ") for k in keypoints["categories"][0]["keypoints"]]

    (t2i,) = _lines(world / "t2i.jsonl")
    assert demo["draw"]["prompt"] == f"Generate image with caption: {t2i['caption']}."
    assert demo["draw"]["expect"] == {"rule": "draw", "colour": t2i["colour"], "shape": t2i["shape"]}
    (edit,) = _lines(world / "edit.jsonl")
    assert demo["edit"]["prompt"] == f"Edit the image according to the caption: {edit['instruction']}."
    assert demo["edit"]["expect"] == {"rule": "edit", **edit["edit"]}


def test_prompts_ask_for_their_routes():
    demo = {i["task"]: i["prompt"] for i in json.loads((SAMPLES / "demo.json").read_text())}
    categories = "circle, square, triangle"
    assert demo["detect"] == DEFAULT_PHRASINGS["det_question"][0].format(categories=categories)
    assert demo["segment"] == DEFAULT_PHRASINGS["semantic_seg_question"][0].format(categories=categories)
    assert demo["count"].startswith("How many shapes are there?") and demo["describe"] == "Describe the image."
    assert demo["pose"].startswith(DEFAULT_PHRASINGS["det_question"][0].format(categories="stick figure"))
