"""Training data: dataset readers, task templates, the mixture and the collator.

- :mod:`.records`: :class:`TaskSample` (one sample of any task), task names, :class:`RecordError`.
- :mod:`.templates`: the instruction phrasings and the rendering of records into question, answer and targets;
  route tokens come only from the route table.
- :mod:`.readers` / :mod:`.coco`: LLaVA conversations, COCO detection/segmentation, referring expressions, COCO
  keypoints, region prompts, text-to-image pairs and edit triplets.
- :mod:`.mixture`: the ``data`` section of the config as one dataset.
- :mod:`.collator`: a list of samples (any mix of tasks) to a model batch with ``decoder_inputs``.

The file formats are documented in ``data/README.md``, with a tiny example of each in ``data/examples/``.
"""

from .coco import CocoDataset, CocoKeypointDataset, RefCocoDataset
from .collator import Collator
from .mixture import READERS, Mixture, build_dataset, build_mixture
from .readers import ConversationDataset, EditDataset, RegionDataset, TaskDataset, TextToImageDataset
from .records import MODES, TASKS, BadRecord, RecordError, TaskSample
from .templates import DEFAULT_PHRASINGS, Rendered, Templates, region_marker, to_turns

__all__ = [
    "BadRecord",
    "CocoDataset",
    "CocoKeypointDataset",
    "Collator",
    "ConversationDataset",
    "DEFAULT_PHRASINGS",
    "EditDataset",
    "MODES",
    "Mixture",
    "READERS",
    "RecordError",
    "RefCocoDataset",
    "RegionDataset",
    "Rendered",
    "TASKS",
    "TaskDataset",
    "TaskSample",
    "Templates",
    "TextToImageDataset",
    "build_dataset",
    "build_mixture",
    "region_marker",
    "to_turns",
]
