"""Dataset readers: the base class (lazy images, seeded per-item sampling, bad-record handling) and the readers of
LLaVA conversations, region prompts, text-to-image pairs and edit triplets. COCO-format readers are in ``coco.py``.

Every reader is a ``torch.utils.data.Dataset`` whose items are :class:`~vllm2.data.records.TaskSample` s. Images are
read when an item is read, from ``image_root`` (default: the annotation file's folder). A malformed record or an
unreadable image raises :class:`~vllm2.data.records.RecordError` naming the file and record index; with
``skip_bad_records=True`` the item is ``None`` instead and the record is listed in :attr:`TaskDataset.bad_records`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..conversation import Turn
from ..images import MAX_IMAGE_PIXELS, load_image
from .annotations import region_to_mask, require
from .records import MODES, BadRecord, RecordError, TaskSample, Unparsable, read_records
from .templates import Rendered, Templates, to_turns

logger = logging.getLogger(__name__)

__all__ = [
    "TaskDataset",
    "RecordFileDataset",
    "ConversationDataset",
    "RegionDataset",
    "TextToImageDataset",
    "EditDataset",
]

_ROLES = {"human": "user", "gpt": "assistant"}


class TaskDataset(Dataset):
    """Base class of the readers.

    Args:
        path: the annotation file.
        image_root: folder that image paths are relative to (default: the annotation file's folder).
        templates: phrasings and sampling rules bound to the route table.
        mode: ``"train"`` (seeded sampling), ``"teacher_forced"`` or ``"question"`` (see ``records.MODES``).
        seed: base seed; item ``i`` of epoch ``e`` samples with ``numpy.random.default_rng([seed, e, i])``.
        skip_bad_records: return ``None`` for a bad record (and list it in ``bad_records``) instead of raising.
        max_image_pixels: larger images are refused (decompression bombs).
        name: dataset name (messages; the keypoint decoder's per-dataset OKS sigmas). Default: the file stem.
    """

    task: str = ""

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None = None,
        *,
        templates: Templates,
        mode: str = "train",
        seed: int = 0,
        skip_bad_records: bool = False,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        name: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (known: {list(MODES)})")
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image root {str(self.image_root)!r} of {str(self.path)!r} is not a folder")
        self.templates = templates
        self.mode = mode
        self.seed = seed
        self.epoch = 0
        self.skip_bad_records = skip_bad_records
        self.max_image_pixels = max_image_pixels
        self.name = name or self.path.stem
        self._bad: dict[str, BadRecord] = {}
        self.bad_count = 0  # skipped reads, repeats included

    # ------------------------------------------------------------------------------------------------ protocol

    def __len__(self) -> int:
        raise NotImplementedError

    def build(self, index: int, rng: np.random.Generator | None) -> TaskSample:
        """Read item ``index``; raise ``ValueError`` (any message) for a bad record or image."""
        raise NotImplementedError

    def source(self, index: int) -> str:
        """``<file>[<record index>]`` of item ``index``."""
        return f"{self.path}[{index}]"

    def task_of(self, index: int) -> str:
        """The task of item ``index`` (without reading it)."""
        return self.task

    # ------------------------------------------------------------------------------------------------ access

    def set_epoch(self, epoch: int) -> None:
        """Select the sampling stream of ``epoch`` (training mode)."""
        self.epoch = epoch

    def rng(self, index: int) -> np.random.Generator | None:
        """The generator of item ``index`` in this epoch (None outside training mode)."""
        return np.random.default_rng([self.seed, self.epoch, index]) if self.mode == "train" else None

    def __getitem__(self, index: int) -> TaskSample | None:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: index {index} out of range (0..{len(self) - 1})")
        return self.get(index, self.rng(index))

    def get(self, index: int, rng: np.random.Generator | None) -> TaskSample | None:
        """Item ``index`` rendered with ``rng``; a bad record raises :class:`RecordError` or, when skipping, is
        recorded and gives ``None``."""
        try:
            return self.build(index, rng)
        except (ValueError, KeyError, TypeError, IndexError, OSError) as err:
            error = err if isinstance(err, RecordError) else RecordError(self.source(index), _describe(err))
            if not self.skip_bad_records:
                if error is err:
                    raise
                raise error from err
            self.report_bad(error.source, error.reason)
            return None

    def report_bad(self, source: str, reason: str) -> None:
        """Count a skipped record (listed once however often it is read)."""
        self.bad_count += 1
        if source not in self._bad:
            self._bad[source] = BadRecord(source, reason)
            logger.warning("skipping bad record %s: %s", source, reason)

    @property
    def bad_records(self) -> list[BadRecord]:
        """The distinct records skipped so far (``skip_bad_records=True``), in the order they were met."""
        return list(self._bad.values())

    # ------------------------------------------------------------------------------------------------ helpers

    def load(self, name: Any, field: str = "image") -> Image.Image:
        """Read the image named by a record field (relative to ``image_root``)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"field {field!r} must be a non-empty image path, got {name!r}")
        path = Path(name) if Path(name).is_absolute() else self.image_root / name
        return load_image(path, self.max_image_pixels)

    def sample(self, index: int, rendered: Rendered, images: list[Image.Image],
               regions: list[tuple[np.ndarray, int]] | None = None) -> TaskSample:
        """The :class:`TaskSample` of a rendered single-turn task in this reader's mode."""
        return TaskSample(self.task_of(index), to_turns(rendered, self.mode), images, regions or [],
                          rendered.targets, self.source(index), rendered.in_text)

    def finish_turns(self, turns: list[Turn]) -> list[Turn]:
        """A conversation for this mode: ``"question"`` drops the final assistant turn."""
        return turns[:-1] if self.mode == "question" and turns[-1][0] == "assistant" else turns


def _describe(err: Exception) -> str:
    text = str(err) if not isinstance(err, KeyError) else f"missing key {err}"
    return text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"


class RecordFileDataset(TaskDataset):
    """A reader over a JSON list / JSONL file, one item per record."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(path, image_root, **kwargs)
        self.records = read_records(self.path)

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> dict:
        """The raw record (a JSON object) of item ``index``."""
        record = self.records[index]
        if isinstance(record, Unparsable):
            raise ValueError(record.reason)
        if not isinstance(record, dict):
            raise ValueError(f"record must be a JSON object, got {type(record).__name__}")
        return record


def parse_conversation(record: dict) -> list[Turn]:
    """LLaVA ``conversations`` as ``(role, text)`` turns: human/gpt alternating, starting with human and ending
    with gpt."""
    conversations = require(record, "conversations", list)
    turns: list[Turn] = []
    for j, turn in enumerate(conversations):
        where = f"conversations[{j}]"
        role = require(turn, "from", str, where)
        if role not in _ROLES:
            raise ValueError(f"{where}.from must be 'human' or 'gpt', got {role!r}")
        expected = "user" if j % 2 == 0 else "assistant"
        if _ROLES[role] != expected:
            raise ValueError(f"{where}.from is {role!r}; turns must alternate human/gpt starting with human")
        turns.append((expected, require(turn, "value", str, where)))
    if not turns or turns[-1][0] != "assistant":
        raise ValueError("conversations must be non-empty and end with a 'gpt' turn")
    return turns


class ConversationDataset(RecordFileDataset):
    """LLaVA-style conversations (JSON list or JSONL).

    Record: ``{"id"?, "image"?: str | [str], "conversations": [{"from": "human" | "gpt", "value": str}, ...]}``.
    ``<image>`` marks where each image goes; without any, the images are placed at the start of the first turn.
    """

    task = "chat"

    def build(self, index: int, rng: np.random.Generator | None) -> TaskSample:
        record = self.record(index)
        names = record.get("image")
        names = [] if names is None else [names] if isinstance(names, str) else names
        if not isinstance(names, list):
            raise ValueError(f"field 'image' must be a path or a list of paths, got {type(names).__name__}")
        turns = self.templates.conversation(parse_conversation(record), len(names))
        images = [self.load(name, f"image[{k}]") for k, name in enumerate(names)]
        return TaskSample(self.task, self.finish_turns(turns), images, [], {}, self.source(index))


class RegionDataset(RecordFileDataset):
    """Region captions and region VQA (JSON list or JSONL), regions given as boxes, masks, polygons or points.

    Records:

    - region caption: ``{"image": str, "regions": [region], "caption": str}`` (exactly one region);
    - region VQA: ``{"image": str, "regions": [region, ...], "conversations": [...]}`` where the text refers to the
      regions as ``<region1>``, ``<region2>``, ... (1-based).

    A region is an object with one of ``box`` ``[x1, y1, x2, y2]``, ``bbox`` ``[x, y, w, h]``, ``polygon`` (COCO
    polygons), ``mask`` (COCO RLE) or ``point`` ``[x, y]`` (pixels of the original image).
    """

    task = "region_vqa"

    def task_of(self, index: int) -> str:
        record = self.records[index]
        return "region_caption" if isinstance(record, dict) and "caption" in record else "region_vqa"

    def build(self, index: int, rng: np.random.Generator | None) -> TaskSample:
        record = self.record(index)
        specs = require(record, "regions", list)
        image = self.load(record.get("image"))
        masks = [region_to_mask(spec, image.width, image.height, f"regions[{k}]") for k, spec in enumerate(specs)]
        if "caption" in record:
            if len(masks) != 1:
                raise ValueError(f"a region caption record needs exactly one region, got {len(masks)}")
            rendered = self.templates.region_caption(require(record, "caption", str), rng)
            return self.sample(index, rendered, [image], [(masks[0], 0)])
        turns = self.templates.conversation(parse_conversation(record), 1)
        turns, order = self.templates.region_conversation(turns, len(masks))
        return TaskSample(self.task_of(index), self.finish_turns(turns), [image], [(masks[k], 0) for k in order], {},
                          self.source(index))


class TextToImageDataset(RecordFileDataset):
    """Text-to-image pairs (JSONL): ``{"image": str, "caption": str}``; the image is the generation target."""

    task = "t2i"

    def build(self, index: int, rng: np.random.Generator | None) -> TaskSample:
        record = self.record(index)
        caption = require(record, "caption", str)
        target = self.load(record.get("image"))
        return self.sample(index, self.templates.text_to_image(caption, target, rng), [])


class EditDataset(RecordFileDataset):
    """Edit triplets (JSONL): ``{"input": str, "instruction": str, "output": str}``; the input image is the sample's
    image, the output image the target."""

    task = "edit"

    def build(self, index: int, rng: np.random.Generator | None) -> TaskSample:
        record = self.record(index)
        instruction = require(record, "instruction", str)
        source, target = self.load(record.get("input"), "input"), self.load(record.get("output"), "output")
        return self.sample(index, self.templates.edit(instruction, target, rng), [source])
