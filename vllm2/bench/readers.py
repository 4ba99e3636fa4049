"""Benchmark-only readers: VQA questions with human answers and images with reference captions (JSON list or JSONL).

- VQA record: ``{"image": str, "question": str, "answers": [str, ...], "question_id"?: int | str,
  "question_type"?: str}``; the prompt is ``"<image>\\n{question} Answer the question using a single word or
  phrase."`` (the official VQA prompt). With ``question_type`` the accuracy is also reported per type.
- Caption record: ``{"image": str, "captions": [str, ...], "image_id"?: int | str}``; the prompt is
  ``"<image>\\nProvide a one-sentence caption for the provided image."``.

Both are generation tasks: the sample holds the question only, whatever the mode.
"""

from __future__ import annotations

import numpy as np

from ..data.annotations import require
from ..data.readers import RecordFileDataset
from ..data.records import TaskSample
from ..tokenizer import IMAGE_TOKEN

__all__ = ["CAPTION_PROMPT", "VQA_SUFFIX", "CaptionDataset", "VqaDataset"]

VQA_SUFFIX = "Answer the question using a single word or phrase."
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."


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
