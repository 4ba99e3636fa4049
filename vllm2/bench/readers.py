"""Benchmark-only readers: VQA questions with human answers, images with reference captions (JSON list or JSONL) and
semantic segmentation folders (ADE20K layout).

- VQA record: ``{"image": str, "question": str, "answers": [str, ...], "question_id"?: int | str,
  "question_type"?: str}``; the prompt is ``"<image>\\n{question} Answer the question using a single word or
  phrase."`` (the official VQA prompt). With ``question_type`` the accuracy is also reported per type.
- Caption record: ``{"image": str, "captions": [str, ...], "image_id"?: int | str}``; the prompt is
  ``"<image>\\nProvide a one-sentence caption for the provided image."``.
- Semantic segmentation folder (:class:`SemsegDataset`): ``images/`` (RGB images), ``annotations/`` (one PNG label map
  per image, same stem and size, 8-bit single channel: class indices, 0 = background / "other", 255 = ignore) and
  ``classes.txt`` (one class name per line, line k = class k, line 0 the background's name). The prompt is the
  semantic segmentation question over classes 1..K-1 in file order (group g is class g + 1); the background is
  never prompted: it is what no class claims.

VQA and captions are generation tasks: the sample holds the question only, whatever the mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..data.annotations import boxes_array, clean_name, mask_to_box, require
from ..data.readers import RecordFileDataset, TaskDataset
from ..data.records import TaskSample
from ..data.templates import CAPTION_PROMPT, VQA_SUFFIX
from ..tokenizer import IMAGE_TOKEN

__all__ = ["IMAGE_SUFFIXES", "CaptionDataset", "SemsegDataset", "VqaDataset", "read_classes"]


def _strings(record: dict, key: str) -> list[str]:
    values = require(record, key, list)
    if not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"field {key!r} must be a non-empty list of strings")
    return values


class VqaDataset(RecordFileDataset):
    """VQA questions; :meth:`answers` gives the human answers of an item."""

    task = "chat"

    def answers(self, index: int) -> list[str]:
        """The human answers of item ``index``."""
        return _strings(self.record(index), "answers")

    def question_type(self, index: int) -> str | None:
        """The item's optional ``question_type`` (as in VQAv2 annotations), or None."""
        value = self.record(index).get("question_type")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"field 'question_type' must be a string, got {value!r}")
        return value

    def build(self, index: int, rng: np.random.Generator | None) -> TaskSample:
        record = self.record(index)
        question = self.templates.check_text(require(record, "question", str), "question").strip()
        self.answers(index)
        self.question_type(index)
        turns = [("user", f"{IMAGE_TOKEN}\n{question} {VQA_SUFFIX}")]
        return TaskSample(self.task, turns, [self.load(record.get("image"))], [], {}, self.source(index))


class CaptionDataset(RecordFileDataset):
    """Images with reference captions; :meth:`references` gives the captions of an item."""

    task = "chat"

    def references(self, index: int) -> list[str]:
        """The reference captions of item ``index``."""
        return _strings(self.record(index), "captions")

    def build(self, index: int, rng: np.random.Generator | None) -> TaskSample:
        record = self.record(index)
        self.references(index)
        turns = [("user", f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}")]
        return TaskSample(self.task, turns, [self.load(record.get("image"))], [], {}, self.source(index))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_LABEL_MODES = ("L", "P")


def read_classes(path: Path) -> list[str]:
    """The class names of a ``classes.txt`` (line k = class k; names cleaned as category names).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an empty line, fewer than 2 or more than 255 classes (255 is the ignore index).
    """
    if not path.is_file():
        raise FileNotFoundError(f"class list {str(path)!r} does not exist (one class name per line, line 0 the "
                                "background)")
    lines = path.read_text(encoding="utf-8").splitlines()
    names = []
    for k, line in enumerate(lines):
        try:
            names.append(clean_name(line, f"line {k + 1}"))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
    if not 2 <= len(names) <= 255:
        raise ValueError(f"{path}: {len(names)} classes; need the background and 1 to 254 classes")
    return names


class SemsegDataset(TaskDataset):
    """A semantic segmentation folder in the ADE20K layout (see the module docstring), one item per image (sorted by
    file name).

    Args:
        path: the folder.
        image_root: the image folder (default: ``path/images``).
        Other arguments: see :class:`~vllm2.data.readers.TaskDataset`.

    Attributes:
        classes: the ``K`` class names (index 0: the background).
        items: image file names, relative to the image folder.
    """

    task = "semantic_seg"

    def __init__(self, path: str | Path, image_root: str | Path | None = None, **kwargs: Any) -> None:
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"semantic segmentation folder {str(folder)!r} does not exist")
        super().__init__(folder, folder / "images" if image_root is None else image_root, **kwargs)
        self.annotations = folder / "annotations"
        if not self.annotations.is_dir():
            raise FileNotFoundError(f"{str(folder)!r} has no annotations/ folder of label PNGs")
        self.classes = [self.templates.check_text(n, f"{folder / 'classes.txt'} class name")
                        for n in read_classes(folder / "classes.txt")]
        self.items = sorted(p.name for p in self.image_root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.items:
            raise ValueError(f"image folder {str(self.image_root)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
        stems = [Path(n).stem for n in self.items]
        if len(set(stems)) != len(stems):
            raise ValueError(f"image folder {str(self.image_root)!r} has two images with the same stem")

    def __len__(self) -> int:
        return len(self.items)

    def source(self, index: int) -> str:
        return str(self.image_root / self.items[index])

    def label_path(self, index: int) -> Path:
        """The label PNG of item ``index``."""
        return self.annotations / f"{Path(self.items[index]).stem}.png"

    def label_map(self, index: int, size: tuple[int, int] | None = None) -> np.ndarray:
        """The ``[H, W]`` uint8 label map of item ``index``, checked against the class list (and the image size
        ``(width, height)``, read from the image file when not given)."""
        path = self.label_path(index)
        if not path.is_file():
            raise FileNotFoundError(f"label map {str(path)!r} of image {self.items[index]!r} does not exist")
        try:
            with Image.open(path) as img:
                if img.mode not in _LABEL_MODES:
                    raise ValueError(f"label map {str(path)!r} is a {img.mode!r} image; it must be 8-bit single "
                                     "channel (mode L or P) class indices")
                label = np.asarray(img)  # [H, W] uint8
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read label map {str(path)!r}: {err}") from err
        if size is None:
            with Image.open(self.image_root / self.items[index]) as img:
                size = img.size
        if label.shape != (size[1], size[0]):
            raise ValueError(f"label map {str(path)!r} is {label.shape[1]}x{label.shape[0]} but its image is "
                             f"{size[0]}x{size[1]}")
        values = np.unique(label)
        bad = values[(values >= len(self.classes)) & (values != 255)]
        if bad.size:
            raise ValueError(f"label map {str(path)!r} has value {int(bad[0])}, beyond the {len(self.classes)} "
                             f"classes of classes.txt (0..{len(self.classes) - 1}; 255 = ignore)")
        return label

    def build(self, index: int, rng: np.random.Generator | None) -> TaskSample:
        image = self.load(self.items[index])
        label = self.label_map(index, image.size)  # [H, W]
        present = [int(c) for c in np.unique(label) if 0 < c < 255]
        masks = np.stack([label == c for c in present]) if present else np.zeros((0, *label.shape), dtype=bool)
        boxes = boxes_array([mask_to_box(m) for m in masks])  # [N, 4]
        categories = np.asarray(present, dtype=np.int64) - 1  # [N] index among the prompted classes 1..K-1
        rendered = self.templates.detection("semantic_seg", self.classes[1:], categories, boxes, masks, rng,
                                            image.size)
        return self.sample(index, rendered, [image])
