"""The synthetic shapes world: determinism, every file loaded by the readers and checked against the drawn pixels,
unique referring expressions, VQA answers and captions checked against the annotations, true edits, the rule-based
checkers on the generator's own images, and the ``vllm2 data shapes`` command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage

from superlink import RouteTable
from vllm2 import shapes
from vllm2.bench import image_judges
from vllm2.bench.readers import CaptionDataset, VqaDataset
from vllm2.cli import main as vllm2_main
from vllm2.cli.data import main as data_main
from vllm2.data import (
    READERS,
    CocoDataset,
    CocoKeypointDataset,
    ConversationDataset,
    EditDataset,
    RefCocoDataset,
    Templates,
    TextToImageDataset,
)
from vllm2.data.templates import CAPTION_PROMPT, VQA_SUFFIX

PALETTE = np.asarray(list(shapes.COLOURS.values()), dtype=np.float64)  # [4, 3]
NAMES = list(shapes.COLOURS)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    shapes.write_dataset(root, n=12, seed=3)
    return root


@pytest.fixture(scope="module")
def templates() -> Templates:
    return Templates(RouteTable.default())


def _pixels(root: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(root / name).convert("RGB"), dtype=np.float64)


def _nearest_palette(pixels: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour of each ``[..., 3]`` pixel."""
    return ((pixels[..., None, :] - PALETTE) ** 2).sum(-1).argmin(-1)


def _is_background(pixels: np.ndarray) -> np.ndarray:
    """Light, grey pixels."""
    return (pixels.min(-1) > 190) & (pixels.max(-1) - pixels.min(-1) < 40)


def _instances(root: Path) -> dict[int, list[dict]]:
    """Per image id: the annotations with decoded mask, centre, kind and file name."""
    data = json.loads((root / "instances.json").read_text())
    files = {im["id"]: im for im in data["images"]}
    kinds = {c["id"]: c["name"] for c in data["categories"]}
    out: dict[int, list[dict]] = {k: [] for k in files}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        out[ann["image_id"]].append({
            **ann, "kind": kinds[ann["category_id"]], "centre": (x + w / 2, y + h / 2),
            "mask": mask_utils.decode(ann["segmentation"]).astype(bool),
            "file_name": files[ann["image_id"]]["file_name"],
            "colour": ann["attributes"]["colour"], "size": ann["attributes"]["size"],
        })
    return out


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_files_and_items_do_not_depend_on_n(tmp_path):
    for name, n, seed in (("a", 3, 5), ("b", 3, 5), ("c", 4, 5), ("d", 3, 6)):
        shapes.write_dataset(tmp_path / name, n=n, seed=seed, size=64, gen_size=32)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    # per item: scene, figure, t2i and two edit images, the semseg copy of the scene and its label map; 11 annotation
    # files and semseg/classes.txt
    assert len(files) == 3 * 7 + 12
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    images = [f for f in files if f.suffix == ".png"]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "c" / f).read_bytes() for f in images)
    assert not any((tmp_path / "a" / f).read_bytes() == (tmp_path / "d" / f).read_bytes() for f in images
                   if "edit" not in str(f) and "t2i" not in str(f))
    assert json.loads((tmp_path / "c" / "refcoco.jsonl").read_text().splitlines()[0]) == \
        json.loads((tmp_path / "a" / "refcoco.jsonl").read_text().splitlines()[0])


# ------------------------------------------------------------------------------------------------ detection / seg


def test_instances_load_and_masks_have_the_shapes_colour(world, templates):
    instances = _instances(world)
    for anns in instances.values():
        image = _pixels(world, anns[0]["file_name"])
        union = np.zeros(image.shape[:2], dtype=bool)
        for ann in anns:
            inside = image[ann["mask"]]
            assert (_nearest_palette(inside) == NAMES.index(ann["colour"])).all()
            ring = ndimage.binary_dilation(ann["mask"]) & ~ann["mask"]
            assert _is_background(image[ring]).all()
            assert ann["area"] == ann["mask"].sum() and 1 <= len(anns) <= 4
            union |= ann["mask"]
        assert _is_background(image[~union]).all()  # nothing is drawn outside the annotated masks

    ds = CocoDataset(world / "instances.json", task="instance_seg", templates=templates, mode="teacher_forced")
    assert ds.names == ["circle", "square", "triangle"] and len(ds) == 12
    for index, image_id in enumerate(sorted(instances)):
        target = ds[index].targets["gdino"]
        anns = instances[image_id]
        got = sorted((ds.names[label], tuple(box), int(mask.sum()))
                     for label, box, mask in zip(target["labels"], target["boxes"].tolist(), target["masks"]))
        want = sorted((a["kind"], tuple(float(v) for v in (a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                                           a["bbox"][1] + a["bbox"][3])), a["area"]) for a in anns)
        assert got == want
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = np.nonzero(mask)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_semseg_label_maps_are_the_instance_masks_by_category(world, templates):
    """semseg/: each label map is the union of the scene's instance masks, each painted with its COCO category id
    (0 elsewhere); the image is the scene image; the bench reader loads it with the shapes as its classes."""
    from vllm2.bench.readers import SemsegDataset

    assert (world / "semseg" / "classes.txt").read_text().splitlines() == ["background", *shapes.SHAPES]
    instances = _instances(world)
    for image_id, anns in instances.items():
        name = Path(anns[0]["file_name"]).name
        label = np.asarray(Image.open(world / "semseg" / "annotations" / name))
        assert label.dtype == np.uint8 and label.shape == anns[0]["mask"].shape
        expected = np.zeros(label.shape, dtype=np.uint8)
        for ann in anns:
            assert not expected[ann["mask"]].any()  # shapes never overlap
            expected[ann["mask"]] = ann["category_id"]
        assert (label == expected).all()
        assert (world / "semseg" / "images" / name).read_bytes() == (world / anns[0]["file_name"]).read_bytes()
    ds = SemsegDataset(world / "semseg", templates=templates, mode="teacher_forced")
    assert len(ds) == len(instances) and ds.classes == ["background", "circle", "square", "triangle"]
    assert "circle, square, triangle" in ds[0].turns[0][1]


# ------------------------------------------------------------------------------------------------ referring


def _referents(expression: str, anns: list[dict]) -> list[dict]:
    """The annotations an expression refers to (attribute words filter; a superlative picks the strict extreme)."""
    words = expression.split()
    *modifiers, noun = words
    found = [a for a in anns if noun in ("shape", a["kind"])]
    superlatives = {"leftmost": (0, min), "rightmost": (0, max), "topmost": (1, min), "bottommost": (1, max)}
    for word in modifiers:
        if word in superlatives:
            axis, pick = superlatives[word]
            extreme = pick(a["centre"][axis] for a in found)
            found = [a for a in found if a["centre"][axis] == extreme]
        else:
            assert word in shapes.COLOURS or word in shapes.SIZES, expression
            found = [a for a in found if word in (a["colour"], a["size"])]
    return found


def test_referring_expressions_identify_exactly_one_shape(world, templates):
    instances = _instances(world)
    by_id = {a["id"]: a for anns in instances.values() for a in anns}
    records = [json.loads(line) for line in (world / "refcoco.jsonl").read_text().splitlines()]
    assert len(records) >= 12 and sum(len(r["expressions"]) for r in records) > 3 * len(records)
    for record in records:
        ann = by_id[record["ann_id"]]
        assert record["bbox"] == ann["bbox"] and record["image"] == ann["file_name"]
        for expression in record["expressions"]:
            assert not expression.startswith("the ")
            assert [a["id"] for a in _referents(expression, instances[ann["image_id"]])] == [ann["id"]], expression
    ds = RefCocoDataset(world / "refcoco.jsonl", task="res", templates=templates, mode="teacher_forced")
    assert len(ds) == sum(len(r["expressions"]) for r in records)
    sample = ds[0]
    assert np.array_equal(sample.targets["gdino"]["masks"][0], by_id[records[0]["ann_id"]]["mask"])
    assert records[0]["expressions"][0] in sample.turns[0][1]


def test_referring_expressions_of_two_identical_shapes_are_positional():
    twins = [shapes.Shape("circle", "red", "small", 10, 40, 16), shapes.Shape("circle", "red", "small", 60, 42, 16)]
    assert shapes.referring_expressions(twins, 0) == ["leftmost shape", "leftmost circle"]
    assert shapes.referring_expressions(twins, 1) == ["rightmost shape", "rightmost circle"]
    stacked = [shapes.Shape("square", "blue", "large", 30, 5, 28), shapes.Shape("square", "blue", "large", 32, 50, 28)]
    assert shapes.referring_expressions(stacked, 0) == ["topmost shape", "topmost square"]


# ------------------------------------------------------------------------------------------------ keypoints


def test_keypoints_lie_on_the_drawn_figures(world, templates):
    data = json.loads((world / "keypoints.json").read_text())
    category = data["categories"][0]
    assert category["keypoints"] == list(shapes.KEYPOINTS)
    assert category["skeleton"] == [list(pair) for pair in shapes.SKELETON]
    ds = CocoKeypointDataset(world / "keypoints.json", templates=templates, mode="teacher_forced")
    assert len(ds) == 12
    colours = {(a["image_id"], tuple(a["bbox"])): a["attributes"]["colour"] for a in data["annotations"]}
    assert len(data["annotations"]) > 12  # some images hold two figures
    for index, entry in enumerate(data["images"]):
        image = _pixels(world, entry["file_name"])
        target = ds[index].targets["keypoint"]
        assert target["keypoint_ids"].tolist() == list(range(7))
        for box, points in zip(target["boxes"], target["keypoints"]):
            x1, y1, x2, y2 = box.tolist()
            colour = colours[(entry["id"], (x1, y1, x2 - x1, y2 - y1))]
            assert (points[:, 2] == 2).all()
            assert ((points[:, 0] >= x1) & (points[:, 0] <= x2) & (points[:, 1] >= y1) & (points[:, 1] <= y2)).all()
            on = image[points[:, 1].astype(int), points[:, 0].astype(int)]  # [7, 3] pixel under each joint
            assert (_nearest_palette(on) == NAMES.index(colour)).all() and not _is_background(on).any()
            head, neck, hip, left_hand, right_hand, left_foot, right_foot = points[:, :2]
            assert head[1] < neck[1] < hip[1] < min(left_foot[1], right_foot[1])
            assert right_hand[0] < neck[0] < left_hand[0] and right_foot[0] < hip[0] < left_foot[0]


# ------------------------------------------------------------------------------------------------ VQA, captions


def _answer(question: str, anns: list[dict], side: int) -> str:
    """The answer to a VQA question, computed from the annotations."""
    if question == "How many shapes are there?":
        return shapes.NUMBERS[len(anns)]
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return shapes.NUMBERS[sum(a["kind"] == m[1] for a in anns)]
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return shapes.NUMBERS[sum(a["colour"] == m[1] for a in anns)]
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        return "yes" if any((a["colour"], a["kind"]) == (m[1], m[2]) for a in anns) else "no"
    m = re.fullmatch(r"(What colour is|What shape is|Is) the ([\w ]+?)( on the left or on the right of the image)?\?",
                     question)
    (ann,) = _referents(m[2], anns)
    if m[1] == "What colour is":
        return ann["colour"]
    if m[1] == "What shape is":
        return ann["kind"]
    assert abs(ann["centre"][0] - side / 2) >= 0.1 * side
    return "left" if ann["centre"][0] < side / 2 else "right"


_QUESTION_TYPES = {  # question pattern -> question_type
    r"How many shapes are there\?": "count",
    r"How many (circle|square|triangle)s are there\?": "count_kind",
    r"How many \w+ shapes are there\?": "count_colour",
    r"What colour is .*": "colour_of",
    r"What shape is .*": "kind_of",
    r"Is the .* on the left or on the right of the image\?": "left_right",
    r"Is there a \w+ \w+\?": "presence",
}


def test_vqa_answers_agree_with_the_annotations(world, templates):
    instances = _instances(world)
    by_file = {anns[0]["file_name"]: anns for anns in instances.values()}
    bench = VqaDataset(world / "vqa_bench.jsonl", templates=templates, mode="question")
    conversations = ConversationDataset(world / "vqa.json", templates=templates, mode="teacher_forced")
    assert len(conversations) == 12 and len(bench) >= 12
    for index, record in enumerate(bench.records):
        assert bench.answers(index) == [_answer(record["question"], by_file[record["image"]], 96)]
        (kind,) = [t for pattern, t in _QUESTION_TYPES.items() if re.fullmatch(pattern, record["question"])]
        assert bench.question_type(index) == kind
        assert bench[index].turns[0][1].endswith(f"{record['question']} {VQA_SUFFIX}")
    asked = [turn for i in range(len(conversations)) for turn in conversations[i].turns]
    assert [text for role, text in asked if role == "assistant"] == [r["answers"][0] for r in bench.records]
    assert len({re.sub(r"\w+", "w", r["question"]) for r in bench.records}) >= 4  # several question types


def test_captions_list_the_shapes_from_left_to_right(world, templates):
    instances = _instances(world)
    bench = CaptionDataset(world / "captions_bench.jsonl", templates=templates, mode="question")
    for index, anns in enumerate(instances[k] for k in sorted(instances)):
        phrases = [f"a {a['size']} {a['colour']} {a['kind']}" for a in sorted(anns, key=lambda a: a["centre"][0])]
        text = bench.references(index)[0]
        assert re.split(r", | and ", text.rstrip(".")) == phrases and text.endswith(".")
    assert bench[0].turns == [("user", f"<image>\n{CAPTION_PROMPT}")]
    chat = ConversationDataset(world / "captions.json", templates=templates, mode="teacher_forced")
    assert chat[0].turns[-1] == ("assistant", bench.references(0)[0])
    coco = COCO(str(world / "captions_coco.json"))
    assert coco.imgToAnns[1][0]["caption"] == bench.references(0)[0]


# ------------------------------------------------------------------------------------------------ gen / edit


def test_t2i_pairs_load_and_the_checkers_read_them(world, templates):
    ds = TextToImageDataset(world / "t2i.jsonl", templates=templates, mode="teacher_forced")
    for index, record in enumerate(ds.records):
        target = ds[index].targets["sd"]
        assert target["caption"] == f"a {record['colour']} {record['shape']}" == record["caption"]
        assert target["image"].size == (64, 64)
        assert image_judges.dominant_colour(target["image"]) == record["colour"]
        assert image_judges.shape_class(target["image"]) == record["shape"]


def test_checkers_are_right_on_generated_scenes():
    scenes = [shapes.make_scene(np.random.default_rng([7, i])) for i in range(60)]
    truth = [(s.kind, m) for scene in scenes for s, m in zip(scene.shapes, scene.masks)]
    assert {kind for kind, _ in truth} == set(shapes.SHAPES)
    assert all(image_judges.shape_class(mask) == kind for kind, mask in truth)
    for scene in scenes:
        areas = scene.masks.sum((1, 2))  # [N]
        largest = {s.colour for s, area in zip(scene.shapes, areas) if area == areas.max()}  # ties: either
        assert image_judges.dominant_colour(scene.image) in largest
        labels = image_judges.colour_labels(scene.image)
        assert np.array_equal(labels >= 0, scene.masks.any(0))
    blank = np.full((32, 32, 3), 240, dtype=np.uint8)
    assert image_judges.dominant_colour(blank) is None and image_judges.shape_class(blank) is None


def test_edit_outputs_differ_from_inputs_only_inside_the_object():
    kinds = set()
    for i in range(60):
        example = shapes.make_edit(np.random.default_rng([11, i]), size=64)
        kinds.add(example.edit["attribute"])
        changed = (example.input != example.output).any(-1)  # [H, W]
        assert changed.any() and not (changed & ~(example.before | example.after)).any()
        assert example.edit["shape"] in example.instruction and example.edit["value"] in example.instruction.replace(
            "bigger", "large").replace("smaller", "small")
        if example.edit["attribute"] == "colour":
            assert np.array_equal(example.before, example.after)
            assert (example.output[example.after] == shapes.COLOURS[example.edit["value"]]).all()
        else:
            grown = example.after.sum() > example.before.sum()
            assert grown == (example.edit["value"] == "large")
            assert (example.output[example.after] == example.input[example.before][0]).all()  # colour kept
    assert kinds == {"colour", "size"}


def test_edit_correct_accepts_true_edits_and_rejects_wrong_ones():
    for i in range(40):
        example = shapes.make_edit(np.random.default_rng([13, i]), size=64)
        assert image_judges.edit_correct(example.input, example.output, example.edit)
        assert image_judges.edit_correct(Image.fromarray(example.input), Image.fromarray(example.output).resize((32, 32),
                                   Image.NEAREST), example.edit)
        assert not image_judges.edit_correct(example.input, example.input, example.edit)
        moved = np.roll(example.output, 24, axis=1)
        assert not image_judges.edit_correct(example.input, moved, example.edit)
        if example.edit["attribute"] == "colour":
            wrong = next(c for c in shapes.COLOURS if c not in (example.edit["value"],))
            recoloured = example.output.copy()
            recoloured[example.after] = shapes.COLOURS[wrong]
            assert not image_judges.edit_correct(example.input, recoloured, example.edit)
        others = image_judges.colour_labels(example.input) >= 0
        others &= ~ndimage.binary_dilation(example.before | example.after, iterations=3)
        if others.sum() > 100:  # a second shape: erasing it breaks "keep the rest"
            erased = example.output.copy()
            erased[others] = shapes.PLAIN
            assert not image_judges.edit_correct(example.input, erased, example.edit)
    for bad in ({"shape": "circle", "attribute": "texture", "value": "red"}, {"shape": "circle", "attribute": "colour",
                "value": "purple"}, {"shape": "star", "attribute": "size", "value": "large"}):
        with pytest.raises(ValueError, match="expected edit must be"):
            image_judges.edit_correct(example.input, example.output, bad)


def test_edit_triplets_load_with_the_reader(world, templates):
    ds = EditDataset(world / "edit.jsonl", templates=templates, mode="teacher_forced")
    for index, record in enumerate(ds.records):
        sample = ds[index]
        assert record["instruction"] in sample.turns[0][1]
        assert image_judges.edit_correct(sample.images[0], sample.targets["ip2p"]["image"], record["edit"])


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_writes_every_task_and_refuses_bad_input(tmp_path, templates, capsys):
    out = tmp_path / "world"
    assert data_main(["shapes", "--out", str(out), "--n", "2", "--seed", "1", "--size", "64", "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["seed"], manifest["n"], manifest["version"]) == (1, 2, shapes.GENERATOR_VERSION)
    for name, task in manifest["tasks"].items():
        reader = READERS[task["reader"]](out / task["file"], templates=templates, mode="teacher_forced",
                                         **task.get("options", {}))
        assert len(reader) >= 2 or name in ("rec", "res"), name
        assert reader[0] is not None
        for key in ("bench_file", "coco_file"):
            assert key not in task or (out / task[key]).is_file()
        assert "bench_dir" not in task or (out / task["bench_dir"] / "classes.txt").is_file()
    assert manifest["tasks"]["semantic_seg"]["bench"] == "semseg"
    assert len(list((out / "images").rglob("*.png"))) == 2 * 5

    assert data_main(["shapes", "--out", str(out), "--n", "2", "-q"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert data_main(["shapes", "--out", str(tmp_path / "x"), "--n", "2", "--size", "200", "-q"]) == 2
    assert "size must be an integer from 64 to 128" in capsys.readouterr().err
    with pytest.raises(ValueError, match="n must be a positive integer"):
        shapes.write_dataset(tmp_path / "y", n=0)
    with pytest.raises(SystemExit) as exit_info:
        vllm2_main(["data", "shapes", "--help"])
    assert exit_info.value.code == 0 and "manifest.json" in capsys.readouterr().out
