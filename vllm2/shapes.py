"""The synthetic shapes world: scenes of coloured shapes, stick figures, text-to-image pairs and edit triplets, their
annotations in the formats the readers of :mod:`vllm2.data` accept, and rule-based checkers of generated and edited
images.

- Scenes (``--size`` pixels, default 96): a light noisy background and 1–4 non-overlapping circles, squares and
  triangles in red, green, blue or yellow, small (14–20 px at 96) or large (26–36 px at 96; sizes scale with the image).
- Figure images: 1–2 stick figures with named joints (head, neck, hip, hands, feet) drawn as thick lines in one colour.
  Figures face the viewer, so (as in COCO) a figure's left hand and foot are on the image's right.
- Text-to-image pairs: one centred shape on a plain background (``gen_size``, default 64), caption "a red circle".
- Edit triplets: 1–2 shapes of different kinds on a plain background, an instruction ("make the circle blue", "make
  the square large") and the true edited image (the same shape recoloured or resized about its centre).

Item ``i`` of each kind is drawn with ``numpy.random.default_rng([seed, kind, i])``, so a dataset is deterministic for
a seed and its first items do not depend on ``n``. :func:`write_dataset` writes everything; see its docstring for the
files; :func:`write_demo` writes the demo's sample images (the first items of a world) and their prompts with
ground truth. The checkers :func:`dominant_colour`, :func:`shape_class` and :func:`edit_correct` read images only.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from .bench.readers import CAPTION_PROMPT, VQA_SUFFIX
from .data.annotations import clean_name, mask_to_box
from .data.templates import DEFAULT_PHRASINGS
from .tokenizer import IMAGE_TOKEN

logger = logging.getLogger(__name__)

__all__ = [
    "COLOURS",
    "DEMO_FILES",
    "EditExample",
    "Figure",
    "FigureScene",
    "GENERATOR_VERSION",
    "KEYPOINTS",
    "QUESTION_TYPES",
    "SHAPES",
    "SIZES",
    "SKELETON",
    "Scene",
    "Shape",
    "caption",
    "colour_labels",
    "dominant_colour",
    "edit_correct",
    "make_edit",
    "make_figures",
    "make_scene",
    "make_t2i",
    "referring_expressions",
    "semantic_label_map",
    "shape_class",
    "vqa_questions",
    "write_dataset",
    "write_demo",
]

GENERATOR_VERSION = 3  # 2: vqa_bench.jsonl records carry question_type; 3: semseg/ (ADE20K layout)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 195, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, tuple[int, int]] = {"small": (14, 20), "large": (26, 36)}  # extent range in pixels at 96 px
KEYPOINTS = ("head", "neck", "hip", "left_hand", "right_hand", "left_foot", "right_foot")
SKELETON = ((1, 2), (2, 3), (2, 4), (2, 5), (3, 6), (3, 7))  # 1-based joint pairs, COCO style
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
QUESTION_TYPES = ("count", "count_kind", "count_colour", "colour_of", "kind_of", "left_right", "presence")
PLAIN = (240, 240, 240)  # background of text-to-image and edit images
SCENE_RANGE, GEN_RANGE = (64, 128), (32, 128)
_KINDS = {"scene": 0, "figure": 1, "t2i": 2, "edit": 3}
_GEN_EXTENTS = {"small": (0.25, 0.32), "large": (0.42, 0.5)}  # edit images, fraction of the side
_T2I_EXTENT = (0.5, 0.7)
_FILL_SQUARE, _FILL_CIRCLE = 0.9, 0.64  # fill-ratio thresholds of shape_class
DEMO_FILES = ("scene.png", "figures.png", "edit.png", "demo.json")  # what write_demo writes


# ------------------------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class Shape:
    """One shape: its kind, colour and size names and its square frame (top-left ``x0, y0``, side ``extent``)."""

    kind: str
    colour: str
    size: str
    x0: int
    y0: int
    extent: int

    @property
    def centre(self) -> tuple[float, float]:
        return self.x0 + self.extent / 2, self.y0 + self.extent / 2

    @property
    def frame(self) -> tuple[int, int, int, int]:
        """The square frame as xyxy pixel edges."""
        return self.x0, self.y0, self.x0 + self.extent, self.y0 + self.extent

    def phrase(self) -> str:
        """``"small red circle"``."""
        return f"{self.size} {self.colour} {self.kind}"

    def mask(self, height: int, width: int) -> np.ndarray:
        """The pixels (centres inside the shape) as bool ``[H, W]``."""
        ys = np.arange(height, dtype=np.float64)[:, None] + 0.5  # [H, 1]
        xs = np.arange(width, dtype=np.float64)[None, :] + 0.5  # [1, W]
        cx, cy = self.centre
        half = self.extent / 2
        if self.kind == "circle":
            return (xs - cx) ** 2 + (ys - cy) ** 2 < half**2
        if self.kind == "square":
            return (np.abs(xs - cx) < half) & (np.abs(ys - cy) < half)
        if self.kind == "triangle":  # apex at the top centre, base at the bottom
            depth = ys - self.y0  # [H, 1]
            return (np.abs(xs - cx) < depth / 2) & (depth < self.extent)
        raise ValueError(f"unknown shape kind {self.kind!r} (known: {list(SHAPES)})")


def _overlaps(frame: Sequence[float], others: Iterable[Sequence[float]], gap: float) -> bool:
    """Whether an xyxy frame comes within ``gap`` pixels of any of ``others``."""
    x1, y1, x2, y2 = frame
    return any(x1 < b[2] + gap and b[0] < x2 + gap and y1 < b[3] + gap and b[1] < y2 + gap for b in others)


def _place(rng: np.random.Generator, width: float, height: float, side: int, taken: list[Sequence[float]],
           margin: int = 2, gap: int = 3, tries: int = 60) -> tuple[int, int] | None:
    """A top-left corner for a ``width x height`` frame inside a ``side`` image, clear of ``taken`` (or None)."""
    hi_x, hi_y = side - margin - int(np.ceil(width)), side - margin - int(np.ceil(height))
    if hi_x < margin or hi_y < margin:
        return None
    for _ in range(tries):
        x, y = int(rng.integers(margin, hi_x + 1)), int(rng.integers(margin, hi_y + 1))
        if not _overlaps((x, y, x + width, y + height), taken, gap):
            return x, y
    return None


def _scaled_extent(rng: np.random.Generator, size_name: str, side: int) -> int:
    low, high = SIZES[size_name]
    return int(rng.integers(round(low * side / 96), round(high * side / 96) + 1))


def _paint(canvas: np.ndarray, masks: Sequence[np.ndarray], colours: Sequence[np.ndarray]) -> np.ndarray:
    """Fill each mask of a float ``[H, W, 3]`` canvas with its colour."""
    for mask, colour in zip(masks, colours):
        canvas[mask] = colour
    return canvas


def _to_uint8(canvas: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _noisy(rng: np.random.Generator, masks: np.ndarray, colours: Sequence[str], noise: float) -> np.ndarray:
    """Masks ``[N, H, W]`` filled with their colours (each slightly off) on a light grey background, plus pixel
    noise of standard deviation ``noise``; ``[H, W, 3]`` uint8."""
    grey = rng.uniform(222, 242) + rng.uniform(-6, 6, 3)  # [3]
    canvas = np.broadcast_to(grey, (*masks.shape[1:], 3)).copy()  # [H, W, 3]
    tints = [np.asarray(COLOURS[c]) + rng.uniform(-10, 10, 3) for c in colours]
    return _to_uint8(_paint(canvas, masks, tints) + noise * rng.standard_normal(canvas.shape, dtype=np.float32))


def _check_side(name: str, side: int, bounds: tuple[int, int]) -> None:
    if not isinstance(side, int) or not bounds[0] <= side <= bounds[1]:
        raise ValueError(f"{name} must be an integer from {bounds[0]} to {bounds[1]} pixels, got {side!r}")


# ------------------------------------------------------------------------------------------------ scenes


@dataclass
class Scene:
    """A drawn scene: the image ``[H, W, 3]`` uint8, its shapes and their masks ``[N, H, W]`` bool."""

    image: np.ndarray
    shapes: list[Shape]
    masks: np.ndarray


def make_scene(rng: np.random.Generator, size: int = 96, max_shapes: int = 4, noise: float = 5.0) -> Scene:
    """Draw 1 to ``max_shapes`` non-overlapping shapes on a light noisy background.

    Args:
        rng: the item's generator.
        size: image side in pixels (64–128).
        max_shapes: most shapes (fewer when they do not fit).
        noise: standard deviation of the pixel noise.
    Returns:
        The scene (shapes in drawing order).
    """
    _check_side("size", size, SCENE_RANGE)
    if not 1 <= max_shapes < len(NUMBERS):
        raise ValueError(f"max_shapes must be from 1 to {len(NUMBERS) - 1}, got {max_shapes!r}")
    shapes: list[Shape] = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        kind, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
        size_name = ("small", "large")[rng.integers(2)]
        extent = _scaled_extent(rng, size_name, size)
        corner = _place(rng, extent, extent, size, [s.frame for s in shapes])
        if corner is not None:
            shapes.append(Shape(kind, colour, size_name, corner[0], corner[1], extent))
    masks = np.stack([s.mask(size, size) for s in shapes])  # [N, H, W]
    return Scene(_noisy(rng, masks, [s.colour for s in shapes], noise), shapes, masks)


def _matches(shape: Shape, attributes: Mapping[str, str]) -> bool:
    return all(getattr(shape, key) == value for key, value in attributes.items())


def _noun(attributes: Mapping[str, str]) -> str:
    """``{"size": "small", "kind": "circle"}`` -> ``"small circle"``; without a kind the noun is "shape"."""
    return " ".join([*(attributes[k] for k in ("size", "colour") if k in attributes), attributes.get("kind", "shape")])


_ATTRIBUTE_SETS = (("kind",), ("colour",), ("size",), ("colour", "kind"), ("size", "kind"), ("size", "colour"),
                   ("size", "colour", "kind"))


def _unique_phrases(shapes: Sequence[Shape], index: int, exclude: str | None = None) -> list[str]:
    """The attribute phrases (no article) that fit ``shapes[index]`` and no other shape, shortest first."""
    out = []
    for keys in _ATTRIBUTE_SETS:
        if exclude in keys:
            continue
        attributes = {k: getattr(shapes[index], k) for k in keys}
        if sum(_matches(s, attributes) for s in shapes) == 1:
            out.append(_noun(attributes))
    return out


def referring_expressions(shapes: Sequence[Shape], index: int, min_gap: float = 6.0) -> list[str]:
    """Expressions that identify ``shapes[index]`` and no other shape, RefCOCO style (no leading article).

    Attribute phrases ("red circle", "small shape", ...) fit exactly one shape; superlatives ("leftmost circle",
    "topmost shape") name the extreme of at least two shapes of a kind (or of all shapes) along an axis,
    ahead of the next one by at least ``min_gap`` pixels.

    Args:
        shapes: the scene's shapes.
        index: the referred shape.
        min_gap: smallest centre distance along the axis to the runner-up of a superlative.
    Returns:
        The expressions (possibly none).
    """
    out = _unique_phrases(shapes, index)
    me = shapes[index]
    for noun, group in (("shape", list(shapes)), (me.kind, [s for s in shapes if s.kind == me.kind])):
        if len(group) < 2:
            continue
        for axis, words in ((0, ("leftmost", "rightmost")), (1, ("topmost", "bottommost"))):
            others = [s.centre[axis] for s in group if s is not me]
            if me.centre[axis] + min_gap <= min(others):
                out.append(f"{words[0]} {noun}")
            if me.centre[axis] - min_gap >= max(others):
                out.append(f"{words[1]} {noun}")
    return out


def caption(shapes: Sequence[Shape]) -> str:
    """``"a small red circle and a large blue square."``: the shapes from left to right."""
    phrases = [f"a {s.phrase()}" for s in sorted(shapes, key=lambda s: s.centre[0])]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text + "."


def vqa_questions(shapes: Sequence[Shape], side: int, rng: np.random.Generator,
                  count: int = 4) -> list[tuple[str, str, str]]:
    """Questions with single-word answers about counts, colours, shapes, positions and presence.

    Candidates are grouped by type (:data:`QUESTION_TYPES`: total count, count of a kind, count of a colour, colour
    of a shape, kind of a shape, left or right, presence); ``count`` types are drawn and one question of each.

    Args:
        shapes: the scene's shapes.
        side: the image side (left/right questions need the shape at least 10% of it off the centre line).
        rng: the generator.
        count: most questions.
    Returns:
        ``(question, answer, question type)`` triples.
    """
    kinds, colours = [s.kind for s in shapes], [s.colour for s in shapes]
    groups: list[list[tuple[str, str]]] = [
        [("How many shapes are there?", NUMBERS[len(shapes)])],
        [(f"How many {k}s are there?", NUMBERS[kinds.count(k)]) for k in SHAPES],
        [(f"How many {c} shapes are there?", NUMBERS[colours.count(c)]) for c in COLOURS],
        [(f"What colour is the {p}?", s.colour)
         for i, s in enumerate(shapes) for p in _unique_phrases(shapes, i, "colour")],
        [(f"What shape is the {p}?", s.kind) for i, s in enumerate(shapes) for p in _unique_phrases(shapes, i, "kind")],
        [(f"Is the {p} on the left or on the right of the image?", "left" if s.centre[0] < side / 2 else "right")
         for i, s in enumerate(shapes) if abs(s.centre[0] - side / 2) >= 0.1 * side
         for p in _unique_phrases(shapes, i)],
        [(f"Is there a {c} {k}?", "yes" if (k, c) in zip(kinds, colours) else "no") for k in SHAPES for c in COLOURS],
    ]
    presence = groups[-1]
    yes, no = [q for q in presence if q[1] == "yes"], [q for q in presence if q[1] == "no"]
    groups[-1] = yes if rng.random() < 0.5 or not no else no
    available = [(qtype, group) for qtype, group in zip(QUESTION_TYPES, groups, strict=True) if group]
    chosen = rng.permutation(len(available))[:count]
    return [(*group[rng.integers(len(group))], qtype) for qtype, group in (available[g] for g in chosen)]


# ------------------------------------------------------------------------------------------------ figures


@dataclass(frozen=True)
class Figure:
    """A stick figure: colour name, joints ``[7, 2]`` (x, y) in :data:`KEYPOINTS` order, line width, head radius."""

    colour: str
    keypoints: np.ndarray
    thickness: float
    head_radius: float

    def mask(self, height: int, width: int) -> np.ndarray:
        """The drawn pixels (limbs within ``thickness / 2`` of a bone, the head disc) as bool ``[H, W]``."""
        ys = np.arange(height, dtype=np.float64)[None, :, None] + 0.5  # [1, H, 1]
        xs = np.arange(width, dtype=np.float64)[None, None, :] + 0.5  # [1, 1, W]
        bones = np.asarray([(a - 1, b - 1) for a, b in SKELETON if a != 1])  # the head-neck bone is inside the head
        start, end = self.keypoints[bones[:, 0]], self.keypoints[bones[:, 1]]  # [S, 2]
        d = end - start  # [S, 2]
        ax, ay = start[:, 0, None, None], start[:, 1, None, None]  # [S, 1, 1]
        dx, dy = d[:, 0, None, None], d[:, 1, None, None]  # [S, 1, 1]
        t = np.clip(((xs - ax) * dx + (ys - ay) * dy) / (dx**2 + dy**2), 0.0, 1.0)  # [S, H, W]
        limbs = ((xs - ax - t * dx) ** 2 + (ys - ay - t * dy) ** 2 <= (self.thickness / 2) ** 2).any(0)  # [H, W]
        hx, hy = self.keypoints[0]
        return limbs | ((xs[0] - hx) ** 2 + (ys[0] - hy) ** 2 <= self.head_radius**2)


@dataclass
class FigureScene:
    """A drawn figure image: the image ``[H, W, 3]`` uint8, its figures and their masks ``[N, H, W]`` bool."""

    image: np.ndarray
    figures: list[Figure]
    masks: np.ndarray


def _pose(rng: np.random.Generator, height: float) -> np.ndarray:
    """Joints ``[7, 2]`` of a figure ``height`` pixels tall, relative to its neck."""
    arm, leg = 0.3 * height, 0.45 * height
    hip = np.array([rng.uniform(-0.03, 0.03) * height, 0.33 * height])
    a_right, a_left = np.radians(rng.uniform(20, 140, 2))  # arm angles from hanging straight down
    b_right, b_left = np.radians(rng.uniform(8, 40, 2))
    return np.array([
        [0.0, -0.17 * height],  # head
        [0.0, 0.0],  # neck
        hip,
        [arm * np.sin(a_left), arm * np.cos(a_left)],  # left hand: the figure's left is the image's right
        [-arm * np.sin(a_right), arm * np.cos(a_right)],
        hip + [leg * np.sin(b_left), leg * np.cos(b_left)],
        hip + [-leg * np.sin(b_right), leg * np.cos(b_right)],
    ])


def make_figures(rng: np.random.Generator, size: int = 96, noise: float = 5.0) -> FigureScene:
    """Draw 1–2 non-overlapping stick figures on a light noisy background.

    Args:
        rng: the item's generator.
        size: image side in pixels (64–128).
        noise: standard deviation of the pixel noise.
    Returns:
        The figure scene.
    """
    _check_side("size", size, SCENE_RANGE)
    count = int(rng.integers(1, 3))
    low, high = (0.5, 0.75) if count == 1 else (0.4, 0.6)
    figures: list[Figure] = []
    frames: list[tuple[float, float, float, float]] = []
    for _ in range(count):
        height = rng.uniform(low, high) * size
        joints = _pose(rng, height)  # [7, 2]
        thickness, radius = max(2.0, 0.05 * height), 0.09 * height
        pad = max(thickness / 2, 1.0)
        top_left = np.minimum(joints.min(0) - pad, joints[0] - radius)  # [2]
        bottom_right = np.maximum(joints.max(0) + pad, joints[0] + radius)  # [2]
        width_height = bottom_right - top_left  # [2]
        corner = _place(rng, width_height[0], width_height[1], size, frames)
        if corner is None:
            continue
        joints = joints - top_left + np.asarray(corner, dtype=np.float64)
        frames.append((corner[0], corner[1], corner[0] + width_height[0], corner[1] + width_height[1]))
        figures.append(Figure(list(COLOURS)[rng.integers(len(COLOURS))], np.round(joints, 2), thickness, radius))
    masks = np.stack([f.mask(size, size) for f in figures])  # [N, H, W]
    return FigureScene(_noisy(rng, masks, [f.colour for f in figures], noise), figures, masks)


# ------------------------------------------------------------------------------------------------ generation pairs


def _plain(size: int, shapes: Sequence[Shape]) -> np.ndarray:
    """Shapes in their exact colours on the plain background, ``[H, W, 3]`` uint8."""
    canvas = np.broadcast_to(np.asarray(PLAIN, dtype=np.float64), (size, size, 3)).copy()  # [H, W, 3]
    masks = [s.mask(size, size) for s in shapes]
    return _to_uint8(_paint(canvas, masks, [np.asarray(COLOURS[s.colour]) for s in shapes]))


def make_t2i(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, Shape, str]:
    """One centred shape (size name "large") on the plain background.

    Returns:
        The image ``[H, W, 3]`` uint8, the shape and its caption (``"a red circle"``).
    """
    _check_side("gen_size", size, GEN_RANGE)
    kind, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
    extent = int(rng.integers(round(_T2I_EXTENT[0] * size), round(_T2I_EXTENT[1] * size) + 1))
    corner = (size - extent) // 2
    shape = Shape(kind, colour, "large", corner, corner, extent)
    return _plain(size, [shape]), shape, f"a {colour} {kind}"


@dataclass
class EditExample:
    """An edit triplet: input and true output images ``[H, W, 3]`` uint8, the instruction, the edit
    (``{"shape", "attribute": "colour" | "size", "value"}``), and the edited shape's masks before and after."""

    input: np.ndarray
    output: np.ndarray
    instruction: str
    edit: dict[str, str]
    before: np.ndarray
    after: np.ndarray


_COLOUR_EDITS = ("make the {kind} {value}", "turn the {kind} {value}", "change the colour of the {kind} to {value}")
_SIZE_EDITS = {"large": ("make the {kind} large", "make the {kind} bigger"),
               "small": ("make the {kind} small", "make the {kind} smaller")}


def _gen_extent(rng: np.random.Generator, size_name: str, side: int) -> int:
    low, high = _GEN_EXTENTS[size_name]
    return int(rng.integers(round(low * side), round(high * side) + 1))


def _resized(rng: np.random.Generator, shape: Shape, others: Sequence[Shape], side: int) -> Shape | None:
    """``shape`` at the other size about the same centre, or None when it would leave the image or touch others."""
    size_name = "small" if shape.size == "large" else "large"
    extent = _gen_extent(rng, size_name, side)
    cx, cy = shape.centre
    x0, y0 = int(round(cx - extent / 2)), int(round(cy - extent / 2))
    new = Shape(shape.kind, shape.colour, size_name, x0, y0, extent)
    inside = min(x0, y0) >= 1 and max(x0, y0) + extent <= side - 1
    return new if inside and not _overlaps(new.frame, [o.frame for o in others], 2) else None


def make_edit(rng: np.random.Generator, size: int = 64) -> EditExample:
    """An edit triplet on the plain background: recolour (or, when it fits, resize) one of 1–2 shapes of different
    kinds.

    Args:
        rng: the item's generator.
        size: image side in pixels (32–128).
    Returns:
        The example.
    """
    _check_side("gen_size", size, GEN_RANGE)
    shapes: list[Shape] = []
    for kind in rng.permutation(SHAPES)[: int(rng.integers(1, 3))]:
        size_name = ("small", "large")[rng.integers(2)]
        extent = _gen_extent(rng, size_name, size)
        corner = _place(rng, extent, extent, size, [s.frame for s in shapes], margin=1, gap=2)
        if corner is not None:
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            shapes.append(Shape(str(kind), colour, size_name, corner[0], corner[1], extent))
    index = int(rng.integers(len(shapes)))
    old = shapes[index]
    others = shapes[:index] + shapes[index + 1:]
    new = _resized(rng, old, others, size) if rng.random() < 0.5 else None
    if new is not None:
        edit = {"shape": old.kind, "attribute": "size", "value": new.size}
        template = _SIZE_EDITS[new.size][rng.integers(len(_SIZE_EDITS[new.size]))]
    else:
        colours = [c for c in COLOURS if c != old.colour]
        new = Shape(old.kind, colours[rng.integers(len(colours))], old.size, old.x0, old.y0, old.extent)
        edit = {"shape": old.kind, "attribute": "colour", "value": new.colour}
        template = _COLOUR_EDITS[rng.integers(len(_COLOUR_EDITS))]
    edited = shapes[:index] + [new] + shapes[index + 1:]
    return EditExample(_plain(size, shapes), _plain(size, edited), template.format(kind=old.kind, value=edit["value"]),
                       edit, old.mask(size, size), new.mask(size, size))


# ------------------------------------------------------------------------------------------------ checkers


def _array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image as float ``[H, W, 3]``."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be RGB [H, W, 3], got shape {arr.shape}")
    return arr


def colour_labels(image: Image.Image | np.ndarray) -> np.ndarray:
    """Per pixel, the index of the nearest palette colour in :data:`COLOURS` order, or -1 where the background (the
    median colour of the image border) is nearer.

    Args:
        image: RGB image (PIL or ``[H, W, 3]``).
    Returns:
        ``[H, W]`` int64 labels.
    """
    arr = _array(image)  # [H, W, 3]
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])  # [P, 3]
    references = np.concatenate([np.median(border, 0)[None], np.asarray(list(COLOURS.values()), np.float64)])  # [5, 3]
    distances = ((arr[:, :, None, :] - references) ** 2).sum(-1)  # [H, W, 5]
    return distances.argmin(-1).astype(np.int64) - 1


def _blobs(labels: np.ndarray, min_pixels: int) -> list[tuple[np.ndarray, int]]:
    """Connected foreground components as ``(mask, majority colour index)``, largest first."""
    components, count = ndimage.label(labels >= 0)
    if count == 0:
        return []
    areas = np.bincount(components.ravel(), minlength=count + 1)[1:]  # [count]
    votes = np.zeros((count + 1, len(COLOURS)), dtype=np.int64)
    fg = components > 0
    np.add.at(votes, (components[fg], labels[fg]), 1)
    order = [int(c) for c in np.argsort(-areas, kind="stable") if areas[c] >= min_pixels]
    return [(components == c + 1, int(votes[c + 1].argmax())) for c in order]


def dominant_colour(image: Image.Image | np.ndarray, min_pixels: int = 4) -> str | None:
    """The colour name of the largest non-background blob (None when there is none)."""
    blobs = _blobs(colour_labels(image), min_pixels)
    return list(COLOURS)[blobs[0][1]] if blobs else None


def shape_class(mask_or_image: Image.Image | np.ndarray, min_pixels: int = 4) -> str | None:
    """The kind of a shape by the fill ratio of its bounding box (square ~1.0, circle ~0.785, triangle ~0.5).

    Args:
        mask_or_image: a bool ``[H, W]`` mask, or an RGB image (its largest non-background blob is classified).
        min_pixels: smaller blobs are ignored.
    Returns:
        ``"square"``, ``"circle"`` or ``"triangle"``; None for an empty mask or an image without a blob.
    """
    if isinstance(mask_or_image, np.ndarray) and mask_or_image.ndim == 2:
        mask = mask_or_image.astype(bool)
    else:
        blobs = _blobs(colour_labels(mask_or_image), min_pixels)
        if not blobs:
            return None
        mask = blobs[0][0]
    if mask.sum() < max(min_pixels, 1):
        return None
    x1, y1, x2, y2 = mask_to_box(mask)
    fill = mask.sum() / ((x2 - x1) * (y2 - y1))
    return "square" if fill >= _FILL_SQUARE else "circle" if fill >= _FILL_CIRCLE else "triangle"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def _check_edit(expected: Mapping[str, str]) -> None:
    sizes = ("large", "small")
    valid = expected.get("shape") in SHAPES and (
        expected.get("attribute") == "colour" and expected.get("value") in COLOURS
        or expected.get("attribute") == "size" and expected.get("value") in sizes)
    if not valid:
        raise ValueError(f"expected edit must be {{'shape': one of {list(SHAPES)}, 'attribute': 'colour' | 'size', "
                         f"'value': one of {list(COLOURS)} | one of {list(sizes)}}}, got {dict(expected)!r}")


def _rest_kept(labels_in: np.ndarray, labels_out: np.ndarray, edited: np.ndarray, threshold: float) -> bool:
    """Whether, away from the edited pixels and from the input's object edges, at least ``threshold`` of the
    background pixels and of the other objects' pixels keep their colour label."""
    foreground = labels_in >= 0
    edges = ndimage.binary_dilation(foreground) & ~ndimage.binary_erosion(foreground)  # ambiguous after resizing
    outside = ~ndimage.binary_dilation(edited, iterations=2) & ~edges
    same = labels_in == labels_out
    return all(same[region].mean() >= threshold
               for region in (outside & ~foreground, outside & foreground) if region.any())


def edit_correct(source: Image.Image | np.ndarray, edited: Image.Image | np.ndarray, expected: Mapping[str, str],
                 iou_threshold: float = 0.7, size_ratio: float = 1.4, keep_threshold: float = 0.9,
                 min_pixels: int = 4) -> bool:
    """Whether ``edited`` makes the requested edit of ``source`` and keeps the rest.

    The edited object is the largest blob of the source whose :func:`shape_class` is ``expected["shape"]``; its
    counterpart is the blob of the edited image that overlaps it most and must be of the same kind. A colour edit
    needs the counterpart in the new colour with mask IoU >= ``iou_threshold``; a size edit needs its area grown
    (``"large"``) or shrunk (``"small"``) by ``size_ratio``, the same colour, and a centre within 10% of the side.
    Outside both masks (grown by 2 px) and away from the source's object edges, at least ``keep_threshold`` of the
    background pixels and of the other objects' pixels keep their colour label.

    Args:
        source, edited: RGB images; the edited image is resized to the source's size if it differs.
        expected: ``{"shape": kind, "attribute": "colour" | "size", "value": colour name | "large" | "small"}`` (the
            ``edit`` field of ``edit.jsonl``).
    Returns:
        True when the edit is right.
    """
    _check_edit(expected)
    before, after = _array(source), _array(edited)
    if after.shape != before.shape:
        after = _array(Image.fromarray(_to_uint8(after)).resize((before.shape[1], before.shape[0]), Image.BILINEAR))
    labels_in, labels_out = colour_labels(before), colour_labels(after)
    candidates = [b for b in _blobs(labels_in, min_pixels) if shape_class(b[0]) == expected["shape"]]
    if not candidates:
        return False
    old_mask, old_colour = candidates[0]
    overlapping = [b for b in _blobs(labels_out, min_pixels) if (b[0] & old_mask).any()]
    if not overlapping:
        return False
    new_mask, new_colour = max(overlapping, key=lambda b: (b[0] & old_mask).sum())
    if shape_class(new_mask) != expected["shape"]:
        return False
    if expected["attribute"] == "colour":
        changed = list(COLOURS)[new_colour] == expected["value"] and _iou(old_mask, new_mask) >= iou_threshold
    else:
        ratio = new_mask.sum() / old_mask.sum()
        grown = ratio >= size_ratio if expected["value"] == "large" else ratio <= 1 / size_ratio
        shift = np.hypot(*(np.argwhere(new_mask).mean(0) - np.argwhere(old_mask).mean(0)))
        changed = grown and new_colour == old_colour and shift <= 0.1 * max(before.shape[:2])
    return bool(changed and _rest_kept(labels_in, labels_out, old_mask | new_mask, keep_threshold))


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
    _check_side("size", size, SCENE_RANGE)
    _check_side("gen_size", gen_size, GEN_RANGE)
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
    _check_side("size", size, SCENE_RANGE)
    _check_side("gen_size", gen_size, GEN_RANGE)
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
