"""The dataset mixture: readers named in the ``data`` section of the project config, resampled and concatenated.

Example (YAML; paths are relative to ``data.root``, default the working directory):

.. code-block:: yaml

    data:
      root: data/examples
      seed: 0                      # default: training.seed
      templates: {max_categories: 100, all_categories_prob: 0.5}
      datasets:
        - {type: llava, path: llava.json, image_root: images}
        - {type: coco, path: coco_instances.json, image_root: images, task: instance_seg, ratio: 2.0}
        - {type: coco_keypoints, path: coco_keypoints.json, image_root: images, ratio: 0.5}

``ratio`` resamples a dataset to ``round(ratio * len)`` items (a seeded random subset below 1, whole copies plus a
seeded subset above 1). ``weight`` instead makes the datasets' lengths proportional to their weights with the total
length unchanged; when one entry has a weight, all must. The mixture is deterministic given the seed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset

from superlink import RouteTable

from ..images import MAX_IMAGE_PIXELS
from .coco import CocoDataset, CocoKeypointDataset, RefCocoDataset
from .readers import ConversationDataset, EditDataset, RegionDataset, TaskDataset, TextToImageDataset
from .records import BadRecord, TaskSample
from .templates import Templates

logger = logging.getLogger(__name__)

__all__ = ["READERS", "Mixture", "build_mixture", "build_dataset"]

READERS: dict[str, type[TaskDataset]] = {
    "llava": ConversationDataset,
    "coco": CocoDataset,
    "refcoco": RefCocoDataset,
    "coco_keypoints": CocoKeypointDataset,
    "regions": RegionDataset,
    "t2i": TextToImageDataset,
    "edit": EditDataset,
}
_OPTIONS: dict[str, tuple[str, ...]] = {"coco": ("task", "prompt"), "refcoco": ("task",)}
_ENTRY_KEYS = ("type", "path", "image_root", "ratio", "weight", "name")
_DATA_KEYS = ("datasets", "root", "seed", "templates")


class Mixture(Dataset):
    """Concatenated, resampled readers.

    Item ``g`` reads item ``local_index[g]`` of ``datasets[dataset_index[g]]``; in training mode it samples with
    ``numpy.random.default_rng([seed, epoch, g])``, so repeated copies of a record draw different phrasings.

    Args:
        datasets: the readers.
        ratios: per reader resampling factor (default 1).
        weights: per reader share of the total length (exclusive with ``ratios``).
        seed: seed of the resampling and of the per-item generators.
    """

    def __init__(self, datasets: Sequence[TaskDataset], ratios: Sequence[float] | None = None,
                 weights: Sequence[float] | None = None, seed: int = 0) -> None:
        if not datasets:
            raise ValueError("a mixture needs at least one dataset")
        if ratios is not None and weights is not None:
            raise ValueError("give either ratios or weights, not both")
        self.datasets = list(datasets)
        self.seed = seed
        self.epoch = 0
        sizes = np.array([len(d) for d in self.datasets], dtype=np.float64)
        for d, size in zip(self.datasets, sizes):
            if size == 0:
                raise ValueError(f"dataset {str(d.path)!r} has no items")
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if len(w) != len(sizes) or (w <= 0).any():
                raise ValueError(f"weights must be one positive number per dataset, got {list(weights)}")
            counts = np.round(w / w.sum() * sizes.sum())
        else:
            r = np.ones(len(sizes)) if ratios is None else np.asarray(ratios, dtype=np.float64)
            if len(r) != len(sizes) or (r <= 0).any():
                raise ValueError(f"ratios must be one positive number per dataset, got {list(ratios or [])}")
            counts = np.round(r * sizes)
        parts, owners = [], []
        for d, (size, count) in enumerate(zip(sizes.astype(int), counts.astype(int))):
            if count < 1:
                raise ValueError(f"dataset {str(self.datasets[d].path)!r}: its ratio/weight leaves no items")
            parts.append(_resample(size, count, np.random.default_rng([seed, d])))
            owners.append(np.full(count, d, dtype=np.int64))
        self.local_index = np.concatenate(parts)  # [M]
        self.dataset_index = np.concatenate(owners)  # [M]
        self.tasks = [self.datasets[d].task_of(int(i)) for d, i in zip(self.dataset_index, self.local_index)]

    def __len__(self) -> int:
        return len(self.local_index)

    def __getitem__(self, index: int) -> TaskSample | None:
        dataset = self.datasets[int(self.dataset_index[index])]
        rng = np.random.default_rng([self.seed, self.epoch, index]) if dataset.mode == "train" else None
        return dataset.get(int(self.local_index[index]), rng)

    def set_epoch(self, epoch: int) -> None:
        """Select the sampling stream of ``epoch``."""
        self.epoch = epoch

    @property
    def bad_records(self) -> list[BadRecord]:
        """The distinct bad records skipped so far by every reader (``skip_bad_records=True``)."""
        return [bad for d in self.datasets for bad in d.bad_records]

    @property
    def bad_count(self) -> int:
        """Skipped reads so far, repeats included."""
        return sum(d.bad_count for d in self.datasets)

    def summary(self) -> str:
        """One line per reader: items in the mixture, items of the reader, file and skipped records."""
        lines = []
        for d, dataset in enumerate(self.datasets):
            count = int((self.dataset_index == d).sum())
            lines.append(f"{dataset.name}: {count} items from {len(dataset)} ({dataset.path}); "
                         f"skipped {len(dataset.bad_records)} bad records")
        return "\n".join(lines)


def _resample(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` indices of ``range(size)``: whole copies, then a random subset (sorted) for the remainder."""
    copies, rest = divmod(count, size)
    extra = np.sort(rng.choice(size, rest, replace=False)) if rest else np.zeros(0, dtype=np.int64)
    return np.concatenate([np.tile(np.arange(size), copies), extra]).astype(np.int64)


def build_dataset(entry: Mapping[str, Any], templates: Templates, *, where: str = "dataset", root: str | Path = ".",
                  **common: Any) -> TaskDataset:
    """Build one reader from a mixture entry (``type``, ``path``, ``image_root``, ``name`` and reader options).

    Args:
        entry: the entry (``ratio`` / ``weight`` are read by :func:`build_mixture`).
        templates: phrasings bound to the route table.
        where: config key of the entry, for messages.
        root: folder that relative paths start from.
        **common: ``mode``, ``seed``, ``skip_bad_records``, ``max_image_pixels``.
    Returns:
        The reader.
    """
    if not isinstance(entry, Mapping):
        raise ValueError(f"config key {where}: expected a mapping, got {entry!r}")
    kind = entry.get("type")
    if kind not in READERS:
        raise ValueError(f"config key {where}.type: unknown dataset type {kind!r} (known: {sorted(READERS)})")
    allowed = _ENTRY_KEYS + _OPTIONS.get(kind, ())
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise KeyError(f"config key {where}: unknown key(s) {unknown} for type {kind!r} (known: {list(allowed)})")
    if not isinstance(entry.get("path"), str):
        raise ValueError(f"config key {where}.path: the annotation file is required")
    root = Path(root)
    path = root / entry["path"]
    image_root = root / entry["image_root"] if entry.get("image_root") is not None else None
    options = {k: entry[k] for k in _OPTIONS.get(kind, ()) if k in entry}
    return READERS[kind](path, image_root, templates=templates, name=entry.get("name"), **options, **common)


def build_mixture(cfg: Any, routes: RouteTable, *, mode: str = "train", skip_bad_records: bool | None = None,
                  max_image_pixels: int | None = None) -> Mixture:
    """The mixture described by ``cfg.data`` (a ``VLLM2Config``) or by a ``data`` mapping.

    Args:
        cfg: the project config, or its ``data`` section as a mapping.
        routes: the route table (the templates write its route tokens).
        mode: ``"train"``, ``"teacher_forced"`` or ``"question"``.
        skip_bad_records: default ``cfg.training.skip_bad_records`` (False for a bare mapping).
        max_image_pixels: default ``cfg.vision.max_image_pixels``.
    Returns:
        The mixture (``tasks`` per item, ``bad_records`` after reading).
    """
    data = cfg.data if hasattr(cfg, "data") else cfg
    training = getattr(cfg, "training", None)
    if not isinstance(data, Mapping):
        raise ValueError(f"config key data: expected a mapping with 'datasets', got {type(data).__name__}")
    unknown = sorted(set(data) - set(_DATA_KEYS))
    if unknown:
        raise KeyError(f"config key data: unknown key(s) {unknown} (known: {list(_DATA_KEYS)})")
    entries = data.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise ValueError("config key data.datasets: a non-empty list of datasets is required")
    seed = int(data.get("seed", training.seed if training is not None else 0))
    if skip_bad_records is None:
        skip_bad_records = bool(training.skip_bad_records) if training is not None else False
    if max_image_pixels is None:
        vision = getattr(cfg, "vision", None)
        max_image_pixels = vision.max_image_pixels if vision is not None else MAX_IMAGE_PIXELS
    template_options = dict(data.get("templates") or {})
    text = cfg.text_link() if hasattr(cfg, "text_link") else None
    try:
        templates = Templates(routes, text=text, **template_options)
    except TypeError as err:
        raise KeyError(f"config key data.templates: {err}") from err
    common = {"mode": mode, "seed": seed, "skip_bad_records": skip_bad_records, "max_image_pixels": max_image_pixels}
    datasets, ratios, weights = [], [], []
    for i, entry in enumerate(entries):
        where = f"data.datasets[{i}]"
        if isinstance(entry, Mapping) and "ratio" in entry and "weight" in entry:
            raise ValueError(f"config key {where}: give ratio or weight, not both")
        datasets.append(build_dataset(entry, templates, where=where, root=data.get("root", "."), **common))
        ratios.append(float(entry.get("ratio", 1.0)))
        weights.append(entry.get("weight"))
    weighted = [w is not None for w in weights]
    if any(weighted) and not all(weighted):
        raise ValueError("config key data.datasets: when one dataset has a weight, every dataset needs one")
    mixture = Mixture(datasets, None if all(weighted) else ratios, [float(w) for w in weights] if all(weighted)
                      else None, seed)
    logger.info("data mixture of %d items:\n%s", len(mixture), mixture.summary())
    return mixture
