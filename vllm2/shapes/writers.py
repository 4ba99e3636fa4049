"""Writers of the shapes world (:mod:`.world`) in the dataset formats the readers of :mod:`vllm2.data` and
:mod:`vllm2.bench` accept: :func:`write_dataset` writes everything (see its docstring for the files) and
:func:`write_demo` writes the demo's sample images (the first items of a world) and their prompts with ground truth.

Item ``i`` of each kind is drawn with ``numpy.random.default_rng([seed, kind, i])``, so a dataset is deterministic for
a seed and its first items do not depend on ``n``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..data.annotations import clean_name, mask_to_box
from ..data.templates import CAPTION_PROMPT, DEFAULT_PHRASINGS, VQA_SUFFIX
from ..tokenizer import IMAGE_TOKEN
from .world import (
    GEN_RANGE,
    KEYPOINTS,
    NUMBERS,
    SCENE_RANGE,
    SHAPES,
    SKELETON,
    EditExample,
    FigureScene,
    Scene,
    Shape,
    caption,
    check_side,
    make_edit,
    make_figures,
    make_scene,
    make_t2i,
    referring_expressions,
    vqa_questions,
)

logger = logging.getLogger(__name__)

__all__ = ["DEMO_FILES", "GENERATOR_VERSION", "semantic_label_map", "write_dataset", "write_demo"]

GENERATOR_VERSION = 3  # 2: vqa_bench.jsonl records carry question_type; 3: semseg/ (ADE20K layout)
_KINDS = {"scene": 0, "figure": 1, "t2i": 2, "edit": 3}
DEMO_FILES = ("scene.png", "figures.png", "edit.png", "demo.json")  # what write_demo writes


# ------------------------------------------------------------------------------------------------ writing


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """A bool mask as compressed COCO RLE with a string ``counts``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")}


def _xywh(mask: np.ndarray) -> list[float]:
    x1, y1, x2, y2 = mask_to_box(mask).tolist()
    return [x1, y1, x2 - x1, y2 - y1]


def _save(image: np.ndarray, root: Path, name: str) -> str:
    Image.fromarray(image).save(root / name, compress_level=1)
    return name


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def _write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _rng(seed: int, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _KINDS[kind], index])


def semantic_label_map(scene: Scene) -> np.ndarray:
    """The scene's ``[H, W]`` uint8 label map: 0 background, ``SHAPES.index(kind) + 1`` (the COCO category id) on
    each shape's pixels (shapes never overlap)."""
    label = np.zeros(scene.masks.shape[1:], dtype=np.uint8)  # [H, W]
    for shape, mask in zip(scene.shapes, scene.masks):
        label[mask] = SHAPES.index(shape.kind) + 1
    return label


def _write_semseg_item(root: Path, image_name: str, scene: Scene, index: int) -> None:
    """Copy a scene image into ``semseg/images/`` and write its label map to ``semseg/annotations/``."""
    shutil.copyfile(root / image_name, root / f"semseg/images/{index:05d}.png")
    _save(semantic_label_map(scene), root, f"semseg/annotations/{index:05d}.png")


def _write_scenes(root: Path, n: int, seed: int, size: int, tick: Callable[[], None]) -> None:
    """Scenes with instances, referring expressions, VQA and captions."""
    images, annotations, refs, vqa, vqa_bench, captions, caption_bench, coco_captions = [], [], [], [], [], [], [], []
    for i in range(n):
        rng = _rng(seed, "scene", i)
        scene = make_scene(rng, size)
        name = _save(scene.image, root, f"images/scenes/{i:05d}.png")
        _write_semseg_item(root, name, scene, i)
        image_id = i + 1
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        for j, (shape, mask) in enumerate(zip(scene.shapes, scene.masks)):
            ann_id = len(annotations) + 1
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": SHAPES.index(shape.kind) + 1,
                "bbox": _xywh(mask), "area": int(mask.sum()), "iscrowd": 0, "segmentation": _rle(mask),
                "attributes": {"colour": shape.colour, "size": shape.size},
            })
            expressions = referring_expressions(scene.shapes, j)
            if expressions:
                refs.append({"image": name, "image_id": image_id, "ann_id": ann_id, "bbox": _xywh(mask),
                             "expressions": expressions, "segmentation": _rle(mask)})
        questions = vqa_questions(scene.shapes, size, rng)
        turns = []
        for k, (question, answer, qtype) in enumerate(questions):
            prefix = f"{IMAGE_TOKEN}\n" if k == 0 else ""
            turns += [{"from": "human", "value": f"{prefix}{question} {VQA_SUFFIX}"}, {"from": "gpt", "value": answer}]
            vqa_bench.append({"question_id": len(vqa_bench) + 1, "image": name, "image_id": image_id,
                              "question": question, "answers": [answer], "question_type": qtype})
        vqa.append({"id": f"scene_{i:05d}_vqa", "image": name, "conversations": turns})
        text = caption(scene.shapes)
        prompt = ("Describe the image.", CAPTION_PROMPT)[rng.integers(2)]
        captions.append({"id": f"scene_{i:05d}_caption", "image": name, "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"}, {"from": "gpt", "value": text}]})
        caption_bench.append({"image": name, "image_id": image_id, "captions": [text]})
        coco_captions.append({"id": image_id, "image_id": image_id, "caption": text})
        tick()
    categories = [{"id": k + 1, "name": kind, "supercategory": "shape"} for k, kind in enumerate(SHAPES)]
    _write_json(root / "instances.json", {"images": images, "annotations": annotations, "categories": categories})
    _write_jsonl(root / "refcoco.jsonl", refs)
    _write_json(root / "vqa.json", vqa)
    _write_jsonl(root / "vqa_bench.jsonl", vqa_bench)
    _write_json(root / "captions.json", captions)
    _write_jsonl(root / "captions_bench.jsonl", caption_bench)
    _write_json(root / "captions_coco.json", {"images": images, "annotations": coco_captions})
    (root / "semseg" / "classes.txt").write_text("".join(f"{n}\n" for n in ("background", *SHAPES)),
                                                 encoding="utf-8")


def _write_figures(root: Path, n: int, seed: int, size: int, tick: Callable[[], None]) -> None:
    """Stick-figure images with COCO keypoints."""
    images, annotations = [], []
    for i in range(n):
        scene = make_figures(_rng(seed, "figure", i), size)
        name = _save(scene.image, root, f"images/figures/{i:05d}.png")
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for figure, mask in zip(scene.figures, scene.masks):
            points = np.concatenate([figure.keypoints, np.full((len(KEYPOINTS), 1), 2.0)], 1)  # [Kp, 3]
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "bbox": _xywh(mask),
                "area": int(mask.sum()), "iscrowd": 0, "segmentation": _rle(mask), "num_keypoints": len(KEYPOINTS),
                "keypoints": [float(v) for v in points.ravel()], "attributes": {"colour": figure.colour},
            })
        tick()
    category = {"id": 1, "name": "stick_figure", "supercategory": "figure", "keypoints": list(KEYPOINTS),
                "skeleton": [list(pair) for pair in SKELETON]}
    _write_json(root / "keypoints.json", {"images": images, "annotations": annotations, "categories": [category]})


def _write_pairs(root: Path, n: int, seed: int, size: int, tick: Callable[[], None]) -> None:
    """Text-to-image pairs and edit triplets."""
    t2i, edits = [], []
    for i in range(n):
        image, shape, text = make_t2i(_rng(seed, "t2i", i), size)
        name = _save(image, root, f"images/t2i/{i:05d}.png")
        t2i.append({"image": name, "caption": text, "shape": shape.kind, "colour": shape.colour})
        tick()
    for i in range(n):
        example = make_edit(_rng(seed, "edit", i), size)
        edits.append({"input": _save(example.input, root, f"images/edit/{i:05d}_in.png"),
                      "instruction": example.instruction,
                      "output": _save(example.output, root, f"images/edit/{i:05d}_out.png"),
                      "edit": example.edit})
        tick()
    _write_jsonl(root / "t2i.jsonl", t2i)
    _write_jsonl(root / "edit.jsonl", edits)


def _task(reader: str, file: str, **extra: Any) -> dict[str, Any]:
    """A manifest entry: the reader type (``data.datasets[].type``), the file and extra fields."""
    return {"reader": reader, "file": file, **extra}


def _manifest(n: int, seed: int, size: int, gen_size: int) -> dict[str, Any]:
    return {
        "generator": "vllm2.shapes",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n": n,
        "size": size,
        "gen_size": gen_size,
        "images": {"scenes": "images/scenes", "figures": "images/figures", "t2i": "images/t2i", "edit": "images/edit"},
        "tasks": {
            "det": _task("coco", "instances.json", options={"task": "det"}, bench="det"),
            "instance_seg": _task("coco", "instances.json", options={"task": "instance_seg"}, bench="seg"),
            "semantic_seg": _task("coco", "instances.json", options={"task": "semantic_seg"}, bench="semseg",
                                  bench_dir="semseg"),
            "rec": _task("refcoco", "refcoco.jsonl", options={"task": "rec"}, bench="rec"),
            "res": _task("refcoco", "refcoco.jsonl", options={"task": "res"}, bench="res"),
            "pose": _task("coco_keypoints", "keypoints.json", bench="pose"),
            "vqa": _task("llava", "vqa.json", bench="vqa", bench_file="vqa_bench.jsonl"),
            "caption": _task("llava", "captions.json", bench="caption", bench_file="captions_bench.jsonl",
                            coco_file="captions_coco.json"),
            "t2i": _task("t2i", "t2i.jsonl", bench="gen"),
            "edit": _task("edit", "edit.jsonl", bench="edit"),
        },
    }


def write_dataset(out: str | Path, n: int, seed: int = 0, size: int = 96, gen_size: int = 64,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write the shapes world under ``out``: ``n`` images of each kind (scenes, figure images, text-to-image pairs,
    edit triplets), annotations in the reader formats and ``manifest.json``.

    Files (image paths in them are relative to ``out``, so readers need no ``image_root``):

    - ``instances.json``: COCO instances (categories circle, square, triangle; RLE masks; ``attributes`` colour, size);
    - ``semseg/``: the scenes in the ADE20K layout for ``vllm2 bench semseg``: ``images/`` (copies of the scene
      images), ``annotations/`` (uint8 PNG label maps: 0 background, the COCO category id on each shape) and
      ``classes.txt`` (background, circle, square, triangle);
    - ``refcoco.jsonl``: referring expressions ("small red circle") that identify one shape, with box and RLE mask;
    - ``keypoints.json``: COCO keypoints of the stick figures (:data:`KEYPOINTS`, :data:`SKELETON`, visibility 2);
    - ``vqa.json`` / ``vqa_bench.jsonl``: LLaVA conversations of single-word questions / one question per record
      (``question``, ``answers``) for ``vllm2 bench vqa``;
    - ``captions.json`` / ``captions_bench.jsonl`` / ``captions_coco.json``: LLaVA caption conversations /
      ``{image, captions}`` records for ``vllm2 bench caption`` / COCO-captions style;
    - ``t2i.jsonl``: ``{image, caption, shape, colour}``; ``edit.jsonl``: ``{input, instruction, output, edit}``;
    - ``manifest.json``: the reader and bench task of each file, the seed, ``n``, sizes and the generator version.

    Args:
        out: the output folder (created).
        n: images per kind (>= 1).
        seed: the seed.
        size: scene and figure image side (64–128).
        gen_size: text-to-image and edit image side (32–128).
        progress: called with 1 after each image (or triplet) is written.
    Returns:
        The manifest.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    check_side("size", size, SCENE_RANGE)
    check_side("gen_size", gen_size, GEN_RANGE)
    root = Path(out)
    for folder in ("images/scenes", "images/figures", "images/t2i", "images/edit", "semseg/images",
                   "semseg/annotations"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    tick = (lambda: progress(1)) if progress is not None else (lambda: None)
    _write_scenes(root, n, seed, size, tick)
    _write_figures(root, n, seed, size, tick)
    _write_pairs(root, n, seed, gen_size, tick)
    manifest = _manifest(n, seed, size, gen_size)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    logger.info("wrote the shapes world (n=%d, seed=%d) to %s", n, seed, root)
    return manifest


# ------------------------------------------------------------------------------------------------ the demo


def _first(slot: str, **fields: str) -> str:
    """The evaluation (first) phrasing of a template slot, filled in."""
    return DEFAULT_PHRASINGS[slot][0].format(**fields)


def _demo_find(scene: Scene) -> dict[str, Any]:
    """The find item's ground truth: the first shape (drawing order) with a referring expression, and its longest
    expression (the first of equal length)."""
    j = next(j for j in range(len(scene.shapes)) if referring_expressions(scene.shapes, j))
    expression = max(referring_expressions(scene.shapes, j), key=len)
    mask = scene.masks[j]
    return {"rule": "find", "expression": expression, "phrase": scene.shapes[j].phrase(),
            "box": mask_to_box(mask).tolist(), "mask": _rle(mask)}


def _demo_items(scene: Scene, figures: FigureScene, t2i: Shape, t2i_caption: str,
                edit: EditExample) -> list[dict[str, Any]]:
    """The eight demo items (task label, image, prompt, ground truth ``expect``)."""
    categories = ", ".join(SHAPES)
    objects = [{"category": s.kind, "phrase": s.phrase(), "box": mask_to_box(m).tolist()}
               for s, m in zip(scene.shapes, scene.masks)]
    regions = [{"category": s.kind, "phrase": s.phrase(), "mask": _rle(m)} for s, m in zip(scene.shapes, scene.masks)]
    find = _demo_find(scene)
    figure_name, keypoint_names = clean_name("stick_figure"), [clean_name(k) for k in KEYPOINTS]
    people = [{"colour": f.colour, "box": mask_to_box(m).tolist(),
               "keypoints": [[float(x), float(y), 2.0] for x, y in f.keypoints]}
              for f, m in zip(figures.figures, figures.masks)]
    pose_prompt = " ".join([_first("det_question", categories=figure_name),
                            _first("pose_question", keypoints=", ".join(keypoint_names))])
    return [
        {"task": "describe", "image": "scene.png", "prompt": "Describe the image.",
         "expect": {"rule": "describe", "caption": caption(scene.shapes)}},
        {"task": "count", "image": "scene.png", "prompt": f"How many shapes are there? {VQA_SUFFIX}",
         "expect": {"rule": "count", "answer": NUMBERS[len(scene.shapes)]}},
        {"task": "detect", "image": "scene.png", "prompt": _first("det_question", categories=categories),
         "expect": {"rule": "detect", "objects": objects}},
        {"task": "segment", "image": "scene.png",
         "prompt": _first("semantic_seg_question", categories=categories),
         "expect": {"rule": "segment", "objects": regions}},
        {"task": "find", "image": "scene.png", "prompt": _first("grounding_question",
                                                                 expression=find["expression"]),
         "expect": find},
        {"task": "pose", "image": "figures.png", "prompt": pose_prompt,
         "expect": {"rule": "pose", "category": figure_name, "keypoint_names": keypoint_names, "figures": people}},
        {"task": "draw", "image": None, "prompt": _first("t2i_question", caption=t2i_caption),
         "expect": {"rule": "draw", "colour": t2i.colour, "shape": t2i.kind}},
        {"task": "edit", "image": "edit.png", "prompt": _first("edit_question", instruction=edit.instruction),
         "expect": {"rule": "edit", **edit.edit}},
    ]


def write_demo(out: str | Path, seed: int = 1, size: int = 96, gen_size: int = 32) -> list[dict[str, Any]]:
    """Write the demo's sample images and prompts: :data:`DEMO_FILES` in ``out`` (other files are left alone).

    The images are the FIRST scene, the FIRST figure image and the FIRST edit input of the world ``vllm2 data
    shapes --seed SEED --size SIZE --gen-size GEN_SIZE`` writes (the same generators, the same PNG encoding);
    ``demo.json`` holds one prompt per task (describe, count, detect, segment, find, pose, draw, edit) in the
    evaluation phrasings of :data:`~vllm2.data.templates.DEFAULT_PHRASINGS`, about those items and about the first
    text-to-image pair's caption, each with its ground truth in ``expect`` (``rule`` names how
    :mod:`vllm2.bench.judges` judges the answer). Deterministic: the same arguments write the same bytes.

    Args:
        out: the folder (created).
        seed: the world's seed (default 1, the held-out world of ``make shapes-bench``).
        size: scene and figure image side (64–128).
        gen_size: text-to-image and edit image side (32–128).
    Returns:
        The items written to ``demo.json``.
    """
    check_side("size", size, SCENE_RANGE)
    check_side("gen_size", gen_size, GEN_RANGE)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    scene = make_scene(_rng(seed, "scene", 0), size)
    figures = make_figures(_rng(seed, "figure", 0), size)
    _, t2i, t2i_caption = make_t2i(_rng(seed, "t2i", 0), gen_size)
    edit = make_edit(_rng(seed, "edit", 0), gen_size)
    for image, name in ((scene.image, "scene.png"), (figures.image, "figures.png"), (edit.input, "edit.png")):
        _save(image, root, name)
    items = _demo_items(scene, figures, t2i, t2i_caption, edit)
    lines = ",\n".join(f"  {json.dumps(item)}" for item in items)
    (root / "demo.json").write_text(f"[\n{lines}\n]\n", encoding="utf-8")
    logger.info("wrote the demo (world seed %d) to %s", seed, root)
    return items
