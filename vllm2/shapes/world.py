"""The shapes world: scenes of coloured shapes, stick figures, text-to-image pairs and edit triplets, drawn with numpy.

- Scenes (``size`` pixels, default 96): a light noisy background and 1–4 non-overlapping circles, squares and
  triangles in red, green, blue or yellow, small (14–20 px at 96) or large (26–36 px at 96; sizes scale with the image).
- Figure images: 1–2 stick figures with named joints (head, neck, hip, hands, feet) drawn as thick lines in one colour.
  Figures face the viewer, so (as in COCO) a figure's left hand and foot are on the image's right.
- Text-to-image pairs: one centred shape on a plain background (``gen_size``, default 64), caption "a red circle".
- Edit triplets: 1–2 shapes of different kinds on a plain background, an instruction ("make the circle blue", "make
  the square large") and the true edited image (the same shape recoloured or resized about its centre).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["COLOURS", "EditExample", "Figure", "FigureScene", "KEYPOINTS", "NUMBERS", "PLAIN", "QUESTION_TYPES",
           "SHAPES", "SIZES", "SKELETON", "Scene", "Shape", "caption", "check_side", "make_edit", "make_figures",
           "make_scene", "make_t2i", "referring_expressions", "to_uint8", "vqa_questions"]

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
_GEN_EXTENTS = {"small": (0.25, 0.32), "large": (0.42, 0.5)}  # edit images, fraction of the side
_T2I_EXTENT = (0.5, 0.7)


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


def to_uint8(canvas: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _noisy(rng: np.random.Generator, masks: np.ndarray, colours: Sequence[str], noise: float) -> np.ndarray:
    """Masks ``[N, H, W]`` filled with their colours (each slightly off) on a light grey background, plus pixel
    noise of standard deviation ``noise``; ``[H, W, 3]`` uint8."""
    grey = rng.uniform(222, 242) + rng.uniform(-6, 6, 3)  # [3]
    canvas = np.broadcast_to(grey, (*masks.shape[1:], 3)).copy()  # [H, W, 3]
    tints = [np.asarray(COLOURS[c]) + rng.uniform(-10, 10, 3) for c in colours]
    return to_uint8(_paint(canvas, masks, tints) + noise * rng.standard_normal(canvas.shape, dtype=np.float32))


def check_side(name: str, side: int, bounds: tuple[int, int]) -> None:
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
    check_side("size", size, SCENE_RANGE)
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
    check_side("size", size, SCENE_RANGE)
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
    return to_uint8(_paint(canvas, masks, [np.asarray(COLOURS[s.colour]) for s in shapes]))


def make_t2i(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, Shape, str]:
    """One centred shape (size name "large") on the plain background.

    Returns:
        The image ``[H, W, 3]`` uint8, the shape and its caption (``"a red circle"``).
    """
    check_side("gen_size", size, GEN_RANGE)
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
    check_side("gen_size", size, GEN_RANGE)
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
