"""The training sample (:class:`TaskSample`), task names, record errors and annotation-file reading.

A reader turns one record of an annotation file into a :class:`TaskSample`: the rendered conversation, its images
and region masks, and the raw targets of every decoder the answer routes to. A record that cannot be used raises
:class:`RecordError`, whose message names the file and the record index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..conversation import Turn

__all__ = [
    "TASKS",
    "MODES",
    "TaskSample",
    "RecordError",
    "BadRecord",
    "read_records",
    "read_json",
    "Unparsable",
]

# Task names. Routed tasks are looked up in the route table with ``RouteTable.route_for_task(task)``.
TASKS = (
    "chat",  # LLaVA-style conversations (images optional, several images allowed)
    "det",  # detection: categories in the question, one route group per category in the answer
    "instance_seg",  # detection with masks
    "semantic_seg",  # one merged mask per category
    "interactive",  # segment the objects shown as region prompts
    "rec",  # referring expression comprehension (box)
    "res",  # referring expression segmentation (box + mask)
    "pose",  # object class groups (det route) then keypoint-name groups (pose route)
    "region_caption",  # describe a region prompt
    "region_vqa",  # conversation about region prompts
    "t2i",  # text-to-image generation
    "edit",  # instruction-based image editing
)

# Rendering modes: "train" samples phrasings, categories and keypoint subsets with a seeded generator;
# "teacher_forced" is the first phrasing with the canonical answer (all categories / keypoints in dataset order);
# "question" is the same prompt without the answer (routed benchmarks that let the model write it).
MODES = ("train", "teacher_forced", "question")


@dataclass
class TaskSample:
    """One training/evaluation sample of any task.

    Attributes:
        task: the task name (one of :data:`TASKS`).
        turns: ``(role, text)`` turns, role ``"user"`` or ``"assistant"``; route and placeholder text already written.
        images: the images, in ``<image>`` order (PIL, RGB, original size).
        regions: ``(bool mask [H, W], image index)`` per ``<region>`` token, in text order.
        targets: decoder name -> raw target in original image pixels (numpy arrays / PIL images): gdino
            ``{"boxes" [N, 4] xyxy, "labels" [N] group index, "masks"? [N, H, W] bool}``; keypoint ``{"boxes",
            "labels", "keypoints" [N, Kp, 3], "areas" [N], "keypoint_ids" [Kp]}``; sd ``{"image", "caption"}``;
            ip2p ``{"image"}`` (the input image is ``images[0]``).
        source: ``"<file>[<index>]"`` of the record, for error messages.
        in_text: the answer writes the targets as location and class tokens (text transmission); they are ground
            truth for benchmarks and reach no decoder.
    """

    task: str
    turns: list[Turn]
    images: list[Image.Image] = field(default_factory=list)
    regions: list[tuple[np.ndarray, int]] = field(default_factory=list)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""
    in_text: bool = False


class RecordError(ValueError):
    """A record (or the image it names) cannot be used; the message starts with ``<file>[<index>]``.

    Args:
        source: ``"<file>[<index>]"``.
        reason: what is wrong.
    """

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


@dataclass(frozen=True)
class BadRecord:
    """A record skipped with ``skip_bad_records=True``: where it is and why it was skipped."""

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing or unparsable file raises naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"annotation file {str(path)!r} is not valid JSON: {err}") from err


def read_records(path: Path) -> list[Any]:
    """The records of a JSON list file or a JSON Lines file (``.jsonl``, one record per line).

    A JSONL line that is not valid JSON is kept as an :class:`Unparsable` placeholder, so that the error surfaces
    (or is skipped) at that record's index like any other malformed record; blank lines are ignored.

    Args:
        path: the annotation file.
    Returns:
        The records, in file order.
    """
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise FileNotFoundError(f"annotation file {str(path)!r} does not exist")
        records: list[Any] = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                records.append(Unparsable(f"line {number} is not valid JSON: {err}"))
        return records
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"annotation file {str(path)!r} must hold a JSON list of records, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class Unparsable:
    """A JSON Lines record that could not be parsed (raised or skipped when the record is read)."""

    reason: str
