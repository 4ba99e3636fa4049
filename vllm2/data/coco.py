"""COCO-format readers: detection / instance / semantic / interactive segmentation, referring expressions and
keypoints (any skeleton). Masks are decoded with pycocotools (polygons, uncompressed and compressed RLE).

Annotations with ``iscrowd: 1`` and boxes of zero width or height are left out of the targets (the usual COCO
training convention); everything else that is malformed is a bad record.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..region import box_to_mask, point_to_mask
from .annotations import boxes_array, clean_name, decode_segmentation, mask_to_box, require, xywh_to_xyxy
from .readers import RecordFileDataset, TaskDataset
from .records import RecordError, TaskSample, read_json

logger = logging.getLogger(__name__)

__all__ = ["CocoFile", "CocoDataset", "RefCocoDataset", "CocoKeypointDataset"]

_PROMPTS = ("box", "point", "mask", "random")


class CocoFile:
    """The index of a COCO annotation file: images, categories (file order) and annotations per image.

    A file that is not a COCO object, or whose categories are malformed, raises ``ValueError`` naming the file. An
    annotation that is not an object or names an unknown image is passed to ``on_bad(source, reason)``.

    Args:
        path: the JSON file.
        on_bad: called for each unusable annotation (it raises or records it).
    """

    def __init__(self, path: Path, on_bad: Callable[[str, str], None]) -> None:
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"COCO file {str(path)!r} must hold a JSON object")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"COCO file {str(path)!r} must have a list {key!r}")
        self.path = path
        self.images: list[Any] = data["images"]
        self.categories: list[dict] = data["categories"]
        self.annotations: list[Any] = data["annotations"]
        self.category_ids: list[int] = []
        for k, cat in enumerate(self.categories):
            try:
                self.category_ids.append(require(cat, "id", int, f"categories[{k}]"))
                require(cat, "name", str, f"categories[{k}]")
            except ValueError as err:
                raise ValueError(f"COCO file {str(path)!r}: {err}") from err
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError(f"COCO file {str(path)!r}: duplicate category ids")
        self.category_index = {cid: k for k, cid in enumerate(self.category_ids)}
        image_ids = {entry.get("id"): k for k, entry in enumerate(self.images) if isinstance(entry, dict)}
        self.by_image: dict[int, list[int]] = {k: [] for k in range(len(self.images))}
        for a, ann in enumerate(self.annotations):
            if not isinstance(ann, dict) or ann.get("image_id") not in image_ids:
                on_bad(f"{path} annotations[{a}]", "annotation is not an object with the 'image_id' of an image")
                continue
            self.by_image[image_ids[ann["image_id"]]].append(a)

    def category_names(self) -> list[str]:
        """Cleaned category names, file order."""
        try:
            return [clean_name(c["name"], f"categories[{k}].name") for k, c in enumerate(self.categories)]
        except ValueError as err:
            raise ValueError(f"COCO file {str(self.path)!r}: {err}") from err

    def image_entry(self, position: int) -> tuple[str, int, int]:
        """``(file_name, width, height)`` of ``images[position]``."""
        entry = self.images[position]
        return (require(entry, "file_name", str, "image entry"), require(entry, "width", int, "image entry"),
                require(entry, "height", int, "image entry"))

    def image_annotations(self, position: int) -> list[tuple[int, dict]]:
        """``(file index, annotation)`` of every annotation of ``images[position]``, file order."""
        return [(a, self.annotations[a]) for a in self.by_image[position]]


def _check_size(image: Image.Image, width: int, height: int) -> None:
    if image.size != (width, height):
        raise ValueError(f"image is {image.width}x{image.height} but the annotation says {width}x{height}")


class _CocoReader(TaskDataset):
    """Shared set-up of the COCO-file readers."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(path, image_root, **kwargs)
        self.coco = CocoFile(self.path, self._bad_at_init)

    def _bad_at_init(self, source: str, reason: str) -> None:
        if not self.skip_bad_records:
            raise RecordError(source, reason)
        self.report_bad(source, reason)

    def _image(self, position: int) -> tuple[Image.Image, int, int]:
        file_name, width, height = self.coco.image_entry(position)
        image = self.load(file_name, "file_name")
        _check_size(image, width, height)
        return image, width, height

    def _source(self, position: int) -> str:
        entry = self.coco.images[position]
        image_id = entry.get("id") if isinstance(entry, dict) else None
        return f"{self.path} images[{position}] (id {image_id})"


class CocoDataset(_CocoReader):
    """COCO detection / instance segmentation JSON, one item per image (file order).

    Args:
        task: ``"det"`` (boxes), ``"instance_seg"`` (boxes + masks), ``"semantic_seg"`` (one merged mask per
            category) or ``"interactive"`` (instances shown as region prompts, segment them; images without
            instances are left out).
        prompt: region prompt of interactive segmentation: ``"box"``, ``"point"`` (a pixel of the mask: random in
            training, the one nearest the mask centroid otherwise), ``"mask"`` or ``"random"`` (one of the three per
            region in training, boxes otherwise).
        Other arguments: see :class:`~vllm2.data.readers.TaskDataset`.
    """

    def __init__(self, path: str | Path, image_root: str | Path | None = None, *, task: str = "det",
                 prompt: str = "box", **kwargs: Any) -> None:
        if task not in ("det", "instance_seg", "semantic_seg", "interactive"):
            raise ValueError(f"COCO reader: unknown task {task!r} (det, instance_seg, semantic_seg, interactive)")
        if prompt not in _PROMPTS:
            raise ValueError(f"COCO reader: unknown prompt {prompt!r} (known: {list(_PROMPTS)})")
        self.task, self.prompt = task, prompt
        super().__init__(path, image_root, **kwargs)
        self.names = [self.templates.check_text(n, f"{self.path} category name") for n in self.coco.category_names()]
        if not self.names:
            raise ValueError(f"COCO file {str(self.path)!r} has no categories")
        positions = range(len(self.coco.images))
        if task == "interactive":
            positions = [k for k in positions if any(_usable(ann) for _, ann in self.coco.image_annotations(k))]
        self.items = list(positions)

    @property
    def category_ids(self) -> list[int]:
        """Dataset category id of each vocabulary index (label order of evaluation prompts)."""
        return self.coco.category_ids

    def __len__(self) -> int:
        return len(self.items)

    def source(self, index: int) -> str:
        return self._source(self.items[index])

    def build(self, index: int, rng: np.random.Generator | None) -> TaskSample:
        position = self.items[index]
        image, width, height = self._image(position)
        with_masks = self.task != "det"
        categories, boxes, masks = self._instances(position, width, height, with_masks)
        if self.task == "semantic_seg":
            categories, boxes, masks = _merge_by_category(categories, masks)
        if self.task == "interactive":
            rendered = self.templates.interactive(boxes, masks, rng)
            regions = [(self._prompt(boxes[k], masks[k], rng), 0) for k in rendered.regions]
            return self.sample(index, rendered, [image], regions)
        rendered = self.templates.detection(self.task, self.names, categories, boxes, masks, rng, (width, height))
        return self.sample(index, rendered, [image])

    def _instances(self, position: int, width: int, height: int,
                   with_masks: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Category index ``[N]``, xyxy boxes ``[N, 4]`` and masks ``[N, H, W]`` of the image's usable instances."""
        categories, boxes, masks = [], [], []
        for a, ann in self.coco.image_annotations(position):
            where = f"annotations[{a}]"
            if ann.get("iscrowd", 0):
                continue
            category = require(ann, "category_id", int, where)
            if category not in self.coco.category_index:
                raise ValueError(f"{where}.category_id {category} is not a category of the file")
            box = xywh_to_xyxy(ann.get("bbox"), f"{where}.bbox")
            if box[2] <= box[0] or box[3] <= box[1]:
                logger.debug("%s: %s has an empty box; left out", self.path, where)
                continue
            if with_masks:
                mask = decode_segmentation(ann.get("segmentation"), height, width, f"{where}.segmentation")
                if not mask.any():
                    logger.debug("%s: %s has an empty mask; left out", self.path, where)
                    continue
                masks.append(mask)
            categories.append(self.coco.category_index[category])
            boxes.append(box)
        stacked = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
        return np.asarray(categories, dtype=np.int64), boxes_array(boxes), stacked if with_masks else None

    def _prompt(self, box: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """The region prompt of one instance (see ``prompt``)."""
        kind = self.prompt
        if kind == "random":
            kind = "box" if rng is None else ("box", "point", "mask")[int(rng.integers(3))]
        height, width = mask.shape
        if kind == "box":
            return box_to_mask(tuple(box.tolist()), width, height)
        if kind == "mask":
            return mask
        ys, xs = np.nonzero(mask)
        if rng is None:
            k = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
        else:
            k = int(rng.integers(len(xs)))
        return point_to_mask((xs[k] + 0.5, ys[k] + 0.5), width, height)


def _usable(ann: Any) -> bool:
    return isinstance(ann, dict) and not ann.get("iscrowd", 0) and "segmentation" in ann


def _merge_by_category(categories: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One instance per category: the union of its masks and that union's box."""
    present = np.unique(categories)  # sorted
    merged = np.stack([masks[categories == c].any(0) for c in present]) if len(present) else masks[:0]
    boxes = boxes_array([mask_to_box(m) for m in merged])
    return present.astype(np.int64), boxes, merged


class RefCocoDataset(RecordFileDataset):
    """Referring expressions (JSON list or JSONL).

    Record: ``{"image": str, "bbox": [x, y, w, h], "expressions": [str, ...] | "sentences": [str | {"sent": str},
    ...], "segmentation"?: COCO polygons or RLE}``. In training an item is a record with a random expression; in
    evaluation modes an item is one (record, expression) pair.

    Args:
        task: ``"rec"`` (box) or ``"res"`` (box + mask; needs ``segmentation``).
        Other arguments: see :class:`~vllm2.data.readers.TaskDataset`.
    """

    def __init__(self, path: str | Path, image_root: str | Path | None = None, *, task: str = "rec",
                 **kwargs: Any) -> None:
        if task not in ("rec", "res"):
            raise ValueError(f"referring-expression reader: unknown task {task!r} (rec, res)")
        self.task = task
        super().__init__(path, image_root, **kwargs)
        if self.mode == "train":
            self.items = [(r, None) for r in range(len(self.records))]
        else:
            self.items = [(r, j) for r, rec in enumerate(self.records) for j in range(max(1, _count_expressions(rec)))]

    def __len__(self) -> int:
        return len(self.items)

    def source(self, index: int) -> str:
        record, expression = self.items[index]
        return f"{self.path}[{record}]" + ("" if expression is None else f" expression {expression}")

    def build(self, index: int, rng: np.random.Generator | None) -> TaskSample:
        position, choice = self.items[index]
        record = self.record(position)
        expressions = _expressions(record)
        if choice is None:
            choice = 0 if rng is None else int(rng.integers(len(expressions)))
        expression = self.templates.check_text(expressions[choice], f"expression {choice}")
        box = xywh_to_xyxy(record.get("bbox"), "bbox")
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"field 'bbox' has zero width or height: {record.get('bbox')!r}")
        image = self.load(record.get("image"))
        mask = None
        if self.task == "res":
            mask = decode_segmentation(record.get("segmentation"), image.height, image.width)
            if not mask.any():
                raise ValueError("field 'segmentation' covers no pixel")
        return self.sample(index, self.templates.grounding(self.task, expression, box, mask, rng, image.size), [image])


def _count_expressions(record: Any) -> int:
    if isinstance(record, dict):
        values = record.get("expressions", record.get("sentences"))
        if isinstance(values, list):
            return len(values)
    return 1


def _expressions(record: dict) -> list[str]:
    """The expressions of a referring record (``expressions`` or refer-style ``sentences``)."""
    key = "expressions" if "expressions" in record else "sentences"
    values = require(record, key, list)
    out = []
    for j, value in enumerate(values):
        text = value.get("sent") if isinstance(value, dict) else value
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{key}[{j}] must be a non-empty string (or {{'sent': str}})")
        out.append(text.strip())
    if not out:
        raise ValueError(f"field {key!r} is empty")
    return out


class CocoKeypointDataset(_CocoReader):
    """COCO keypoints JSON with any skeleton: keypoint names come from ``categories[].keypoints``.

    An item is one (image, keypoint category) pair: in training the pairs with at least one instance with labelled
    keypoints, in evaluation modes every pair. Instances with no labelled keypoint (``num_keypoints == 0``) and
    crowd annotations are left out of the targets.

    Args: see :class:`~vllm2.data.readers.TaskDataset` (``name`` is passed as the target's ``dataset`` for the
    keypoint decoder's OKS sigmas when the whole skeleton is prompted).
    """

    task = "pose"

    def __init__(self, path: str | Path, image_root: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(path, image_root, **kwargs)
        self.skeletons: list[tuple[int, str, list[str]]] = []  # (category id, name, keypoint names)
        for k, cat in enumerate(self.coco.categories):
            names = cat.get("keypoints")
            if names:
                if not isinstance(names, list):
                    raise ValueError(f"COCO file {str(self.path)!r}: categories[{k}].keypoints must be a list")
                cleaned = [self._name(n, f"categories[{k}].keypoints[{j}]") for j, n in enumerate(names)]
                self.skeletons.append((cat["id"], self._name(cat["name"], f"categories[{k}].name"), cleaned))
        if not self.skeletons:
            raise ValueError(f"COCO file {str(self.path)!r} has no category with 'keypoints'")
        pairs = [(k, s) for k in range(len(self.coco.images)) for s in range(len(self.skeletons))]
        if self.mode == "train":
            pairs = [(k, s) for k, s in pairs if any(
                _labelled(ann, self.skeletons[s][0]) for _, ann in self.coco.image_annotations(k))]
        self.items = pairs

    def _name(self, name: Any, field: str) -> str:
        try:
            return self.templates.check_text(clean_name(name, field), field)
        except ValueError as err:
            raise ValueError(f"COCO file {str(self.path)!r}: {err}") from err

    def __len__(self) -> int:
        return len(self.items)

    def source(self, index: int) -> str:
        position, skeleton = self.items[index]
        return f"{self._source(position)} category {self.skeletons[skeleton][0]}"

    def build(self, index: int, rng: np.random.Generator | None) -> TaskSample:
        position, skeleton = self.items[index]
        category, name, keypoint_names = self.skeletons[skeleton]
        image, _, _ = self._image(position)
        boxes, keypoints, areas = [], [], []
        for a, ann in self.coco.image_annotations(position):
            where = f"annotations[{a}]"
            if ann.get("category_id") != category or ann.get("iscrowd", 0):
                continue
            points = _keypoints(ann.get("keypoints"), len(keypoint_names), f"{where}.keypoints")
            if not (points[:, 2] > 0).any():
                continue
            box = xywh_to_xyxy(ann.get("bbox"), f"{where}.bbox")
            area = ann.get("area", float((box[2] - box[0]) * (box[3] - box[1])))
            if not isinstance(area, (int, float)) or area < 0:
                raise ValueError(f"{where}.area must be a number >= 0, got {area!r}")
            boxes.append(box)
            keypoints.append(points)
            areas.append(float(area))
        points = np.stack(keypoints) if keypoints else np.zeros((0, len(keypoint_names), 3), dtype=np.float32)
        rendered = self.templates.pose(name, keypoint_names, boxes_array(boxes), points,
                                       np.asarray(areas, dtype=np.float32), rng, dataset=self.name,
                                       image_size=image.size)
        return self.sample(index, rendered, [image])


def _labelled(ann: Any, category: int) -> bool:
    if not isinstance(ann, dict) or ann.get("category_id") != category or ann.get("iscrowd", 0):
        return False
    count = ann.get("num_keypoints")
    if isinstance(count, int):
        return count > 0
    values = ann.get("keypoints")
    return isinstance(values, list) and any(isinstance(v, (int, float)) and v > 0 for v in values[2::3])


def _keypoints(values: Any, count: int, field: str) -> np.ndarray:
    """A flat COCO keypoint list ``[x1, y1, v1, ...]`` as ``[Kp, 3]`` float32 (v in {0, 1, 2})."""
    if not isinstance(values, list) or len(values) != 3 * count:
        raise ValueError(f"{field} must be a list of {3 * count} numbers (x, y, v per keypoint)")
    try:
        points = np.asarray(values, dtype=np.float32).reshape(count, 3)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{field} must hold numbers: {err}") from err
    if not np.isfinite(points).all() or not np.isin(points[:, 2], (0, 1, 2)).all():
        raise ValueError(f"{field}: coordinates must be finite and visibilities 0, 1 or 2")
    return points
