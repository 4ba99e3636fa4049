"""The benchmark tasks: which reader, which routes, how one prediction is scored, how scores become metrics.

A task scores each sample into a small record (plain Python data, so shards can be gathered and merged), then
aggregates the records of the whole run with the metric functions of this package. A prediction is a
:class:`SamplePrediction`: the generated text, the route tokens emitted, and per decoder the route token and (in
routed mode) the phrase of each query group with the decoder's result. In teacher-forced mode ``phrases`` is None:
the prompt lists every category / keypoint in dataset order, so a group index is the dataset index. Decoder errors and
routes to unconfigured decoders are counted by the runner (:func:`~vllm2.bench.runner.summarize`), for every task
alike; here they are misses.

Routed predictions map phrases to the dataset's vocabulary by :func:`normalize_name` (a phrase that names nothing
is dropped). ``None`` as a prediction is a miss (missing or wrong route): no detections, empty text, 0 similarity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from superlink import RouteTable

from ..data.coco import CocoDataset, CocoKeypointDataset, RefCocoDataset
from ..data.readers import EditDataset, TaskDataset, TextToImageDataset
from ..data.records import TaskSample
from ..data.templates import Templates
from .image_judges import dominant_colour, edit_correct, shape_class
from .metrics_clip import ClipScorer, clip_score, edit_metrics
from .metrics_coco import coco_eval, detections_to_coco, keypoint_sigmas, keypoints_to_coco, load_coco
from .metrics_ground import aligned_box_iou, iou_summary, mask_counts, match_instances, pck, rec_accuracy, top1
from .metrics_semseg import label_map_from_masks, semseg_counts, semseg_metrics
from .metrics_text import caption_metrics, vqa_accuracy
from .readers import CaptionDataset, SemsegDataset, VqaDataset

__all__ = ["JUDGES", "TASKS", "BenchTask", "DecoderPrediction", "SamplePrediction", "TaskOptions", "build_task",
           "normalize_name", "routed_keypoints"]


@dataclass
class DecoderPrediction:
    """What one decoder made of one sample's query groups.

    Attributes:
        group_routes: the route token of each group, in group order.
        phrases: the phrase the model wrote before each group (routed), or None (teacher-forced).
        result: the decoder's per-sample result (dict of tensors, or a PIL image); None on error.
        error: a message when the decoder is missing or failed.
        unconfigured: the decoder is not configured in the model (``error`` says so).
    """

    group_routes: list[str]
    phrases: list[str] | None = None
    result: Any = None
    error: str | None = None
    unconfigured: bool = False


@dataclass
class SamplePrediction:
    """One sample's prediction: the generated text, the route tokens emitted (in order) and the decoder outputs."""

    text: str = ""
    routes: list[str] = field(default_factory=list)
    outputs: dict[str, DecoderPrediction] = field(default_factory=dict)


@dataclass
class TaskOptions:
    """Task settings from the command line.

    Attributes:
        judge: how gen/edit outputs are scored: ``"clip"`` (CLIP metrics, needs ``clip``) or ``"shapes"`` (the
            rule-based judges of the shapes world, :mod:`~.image_judges`; records carry ``shape``/``colour`` or
            ``edit``).
        clip: the CLIP scorer (gen, edit).
        sigmas: OKS sigmas (pose); default from the skeleton.
        pck_alpha: PCK threshold as a fraction of the box's longer side (pose).
        iou_threshold: REC hit threshold.
        mask_score_threshold: semseg: a predicted mask paints its class only with a score above this.
        reduce_zero_label: semseg: pixels labelled 0 are ignored and class 0 leaves the metrics (ADE20K).
    """

    judge: str = "clip"
    clip: ClipScorer | None = None
    sigmas: Sequence[float] | None = None
    pck_alpha: float = 0.2
    iou_threshold: float = 0.5
    mask_score_threshold: float = 0.1
    reduce_zero_label: bool = False


def normalize_name(text: str) -> str:
    """Lowercase, underscores to spaces, punctuation dropped, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.replace("_", " ").lower()).split())


def _array(value: Any) -> np.ndarray:
    return np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=np.float64)


def _list(value: Any) -> list:
    return _array(value).tolist()


def _output(pred: SamplePrediction | None, decoder: str) -> DecoderPrediction | None:
    """The usable output of ``decoder`` (None: a miss, a decoder error, or no result)."""
    out = pred.outputs.get(decoder) if pred is not None else None
    if out is None or out.error is not None or out.result is None:
        return None
    return out


def _coco_image_id(dataset: TaskDataset, index: int) -> int:
    """The COCO image id of item ``index`` of a COCO-file reader."""
    position = dataset.items[index]
    position = position[0] if isinstance(position, tuple) else position
    return int(dataset.coco.images[position]["id"])


def routed_keypoints(out: DecoderPrediction, name: str, names: Sequence[str],
                     pose_token: str) -> tuple[list[bool], np.ndarray]:
    """Read a routed pose answer by its phrases: which object groups name the object class, and the keypoints in
    skeleton order (each keypoint group goes to the skeleton slot its phrase names; unnamed slots stay (0, 0, 0)).

    Args:
        out: the pose decoder's output (``phrases`` and ``group_routes`` of a routed answer).
        name: the object class; names: the skeleton's keypoint names in order.
        pose_token: the route token of the keypoint groups (the other groups are object groups).
    Returns:
        Per object group whether its phrase is ``name``, and keypoints ``[n, Kp, 3]`` in the order of ``names``.
    """
    keypoints = _array(out.result["keypoints"])  # [n, Kp', 3]
    objects = [p for p, r in zip(out.phrases, out.group_routes) if r != pose_token]
    parts = [p for p, r in zip(out.phrases, out.group_routes) if r == pose_token]
    named = [normalize_name(p) == normalize_name(name) for p in objects]
    slot = {normalize_name(n): k for k, n in enumerate(names)}
    ordered = np.zeros((len(keypoints), len(names), 3))  # [n, Kp, 3]; unnamed keypoints stay at (0, 0, 0)
    seen: set[int] = set()
    for j, phrase in enumerate(parts[: keypoints.shape[1]]):
        k = slot.get(normalize_name(phrase))
        if k is not None and k not in seen:
            ordered[:, k] = keypoints[:, j]
            seen.add(k)
    return named, ordered


class BenchTask:
    """One benchmark task (subclasses fill in the reader, routes, scoring and aggregation).

    Attributes:
        name: the ``vllm2 bench`` task name.
        route_tasks: the data tasks whose routes a correct answer emits (empty: a text answer).
        teacher_forced: whether the task can run teacher-forced (it has a decoder).
        max_new_tokens: the default answer budget in routed mode (VQA 10 and captions 30 as in the official
            evaluation; detection room for every COCO category).
        data_is_folder: ``--data`` names a folder (semseg), not an annotation file.
    """

    name: ClassVar[str] = ""
    route_tasks: ClassVar[tuple[str, ...]] = ()
    teacher_forced: ClassVar[bool] = True
    max_new_tokens: ClassVar[int] = 64
    data_is_folder: ClassVar[bool] = False

    def __init__(self, options: TaskOptions | None = None) -> None:
        self.options = options or TaskOptions()
        self.routes: RouteTable | None = None

    def bind(self, routes: RouteTable) -> BenchTask:
        """Attach the route table (the task's route tokens and decoders come from it)."""
        self.routes = routes
        for task in self.route_tasks:
            routes.route_for_task(task)
        return self

    def expected_routes(self) -> tuple[str, ...]:
        """The route tokens a correct answer emits (each at least once, no other)."""
        return tuple(dict.fromkeys(self.routes.route_for_task(t) for t in self.route_tasks))

    def decoder(self, task: str | None = None) -> str:
        """The decoder that receives the task's main groups (for pose: the absorbing pose decoder)."""
        token = self.routes.route_for_task(task or self.route_tasks[-1])
        return self.routes.route(token).decoder

    def decoder_options(self) -> dict[str, dict[str, Any]]:
        """Keyword options for the decoders' ``predict``."""
        return {}

    def build_dataset(self, path: Path, image_root: Path | None, templates: Templates, mode: str,
                      **common: Any) -> TaskDataset:
        """The task's reader over the annotation file ``path`` in reader ``mode`` (``"question"`` or
        ``"teacher_forced"``); ``common`` goes to the reader (``max_image_pixels``, ...)."""
        raise NotImplementedError

    def check_options(self) -> None:
        """Raise ``ValueError`` when a needed option is missing (called before any compute)."""

    def score(self, dataset: TaskDataset, index: int, sample: TaskSample, pred: SamplePrediction | None) -> dict:
        """The score record of item ``index`` (plain data); ``pred`` None is a miss."""
        raise NotImplementedError

    def aggregate(self, dataset: TaskDataset, records: list[dict]) -> dict[str, Any]:
        """The metrics of a run from the records of all its items, in item order."""
        raise NotImplementedError


class DetectionTask(BenchTask):
    """COCO detection: bbox AP / AP50 / AP75 against the annotation file (images of the run only)."""

    name = "det"
    route_tasks = ("det",)
    max_new_tokens = 1024
    data_task: ClassVar[str] = "det"
    iou_types: ClassVar[tuple[str, ...]] = ("bbox",)

    def decoder_options(self) -> dict[str, dict[str, Any]]:
        return {self.decoder(): {"mode": "det", "return_masks": "segm" in self.iou_types}}

    def build_dataset(self, path, image_root, templates, mode, **common):
        return CocoDataset(path, image_root, task=self.data_task, templates=templates, mode=mode, **common)

    def category_ids(self, dataset: CocoDataset, out: DecoderPrediction) -> list[int | None]:
        """Dataset category id of each group: by position (teacher-forced) or by the phrase (routed)."""
        if out.phrases is None:
            return list(dataset.category_ids)
        index = {normalize_name(n): dataset.category_ids[k] for k, n in enumerate(dataset.names)}
        return [index.get(normalize_name(p)) for p in out.phrases]

    def score(self, dataset, index, sample, pred):
        image_id = _coco_image_id(dataset, index)
        out = _output(pred, self.decoder())
        if out is None:
            return {"image_id": image_id, "results": []}
        results = detections_to_coco(image_id, out.result, self.category_ids(dataset, out),
                                     with_masks="segm" in self.iou_types)
        return {"image_id": image_id, "results": results}

    def aggregate(self, dataset, records):
        gt = load_coco(str(dataset.path))
        ids = sorted({r["image_id"] for r in records})
        results = [x for r in records for x in r["results"]]
        return {t: coco_eval(gt, results, t, image_ids=ids) for t in self.iou_types}


class SegmentationTask(DetectionTask):
    """COCO instance segmentation: bbox and segm AP."""

    name = "seg"
    route_tasks = ("instance_seg",)
    data_task = "instance_seg"
    iou_types = ("bbox", "segm")


class RecTask(BenchTask):
    """Referring expression comprehension: Acc@0.5 of the top-1 box."""

    name = "rec"
    route_tasks = ("rec",)
    masks: ClassVar[bool] = False

    def decoder_options(self) -> dict[str, dict[str, Any]]:
        return {self.decoder(): {"mode": "grounding", "return_masks": self.masks}}

    def build_dataset(self, path, image_root, templates, mode, **common):
        return RefCocoDataset(path, image_root, task=self.name, templates=templates, mode=mode, **common)

    def score(self, dataset, index, sample, pred):
        target = sample.targets[self.decoder()]
        out = _output(pred, self.decoder())
        box = top1(out.result, "boxes") if out is not None else None
        record = {"pred": None if box is None else _list(box), "gt": _list(target["boxes"][0])}
        if self.masks:
            mask = top1(out.result, "masks") if out is not None else None
            record["inter"], record["union"] = mask_counts(mask, target["masks"][0])
        return record

    def aggregate(self, dataset, records):
        preds, gts = [r["pred"] for r in records], [r["gt"] for r in records]
        metrics = {f"Acc@{self.options.iou_threshold}": rec_accuracy(preds, gts, self.options.iou_threshold)}
        hit = [p is not None for p in preds]
        if any(hit):
            ious = aligned_box_iou(np.asarray([p for p in preds if p is not None]),
                                   np.asarray([g for p, g in zip(preds, gts) if p is not None]))
            metrics["mean_box_IoU"] = float(ious.sum() / len(preds))
        else:
            metrics["mean_box_IoU"] = 0.0
        if self.masks:
            metrics.update(iou_summary([r["inter"] for r in records], [r["union"] for r in records]))
        return metrics


class ResTask(RecTask):
    """Referring expression segmentation: cIoU and mIoU of the top-1 mask (and the box Acc@0.5)."""

    name = "res"
    route_tasks = ("res",)
    masks = True


class SemsegTask(BenchTask):
    """Semantic segmentation on an ADE20K-layout folder: mIoU, aAcc, mAcc and per-class IoU / accuracy
    (:mod:`.metrics_semseg`).

    The decoder reads the ``[SEG]`` groups in detection mode with masks; the masks above
    ``TaskOptions.mask_score_threshold`` are painted into a label map (higher score wins, uncovered pixels are the
    background, class 0). A miss (wrong route, decoder error, no result) is an all-background map, counted in
    ``missing``; a routed phrase that names no class is dropped and counted in ``unknown_phrases``.
    """

    name = "semseg"
    route_tasks = ("semantic_seg",)
    max_new_tokens = 1024
    data_is_folder = True

    def decoder_options(self) -> dict[str, dict[str, Any]]:
        return {self.decoder(): {"mode": "det", "return_masks": True,
                                 "score_threshold": self.options.mask_score_threshold}}

    def build_dataset(self, path, image_root, templates, mode, **common):
        dataset = SemsegDataset(path, image_root, templates=templates, mode=mode, **common)
        seen: dict[str, int] = {}
        for k, name in enumerate(dataset.classes):
            if seen.setdefault(normalize_name(name), k) != k:
                raise ValueError(f"{path / 'classes.txt'}: classes {seen[normalize_name(name)]} and {k} have the "
                                 f"same name {name!r}")
        return dataset

    def group_classes(self, dataset: SemsegDataset, out: DecoderPrediction) -> list[int | None]:
        """Class index of each group: ``g + 1`` (teacher-forced: classes 1..K-1 in order) or by the phrase."""
        if out.phrases is None:
            return list(range(1, len(dataset.classes)))
        index = {normalize_name(n): k for k, n in enumerate(dataset.classes) if k > 0}
        return [index.get(normalize_name(p)) for p in out.phrases]

    def predicted_map(self, dataset: SemsegDataset, out: DecoderPrediction, shape: tuple[int, int]) -> np.ndarray:
        """The ``[H, W]`` label map painted from the decoder's masks."""
        if "masks" not in out.result:
            raise ValueError(f"decoder {self.decoder()!r} returned no masks for semantic segmentation")
        groups = self.group_classes(dataset, out)
        labels = _array(out.result["labels"]).astype(np.int64).tolist()
        classes = [groups[g] if g < len(groups) else None for g in labels]
        return label_map_from_masks(out.result["masks"], out.result["scores"], classes, shape)

    def score(self, dataset, index, sample, pred):
        label = dataset.label_map(index, sample.images[0].size)  # [H, W]
        out = _output(pred, self.decoder())
        if out is None:  # a miss: background everywhere
            predicted, unknown = np.zeros(label.shape, dtype=np.int64), 0  # [H, W]
        else:
            predicted = self.predicted_map(dataset, out, label.shape)  # [H, W]
            unknown = 0 if out.phrases is None else sum(c is None for c in self.group_classes(dataset, out))
        inter, pred_area, label_area = semseg_counts(predicted, label, len(dataset.classes),
                                                     reduce_zero_label=self.options.reduce_zero_label)
        return {"inter": inter.tolist(), "pred": pred_area.tolist(), "label": label_area.tolist(),
                "missing": out is None, "unknown_phrases": unknown}

    def aggregate(self, dataset, records):
        names = list(dataset.classes)
        rows = [(r["inter"], r["pred"], r["label"]) for r in records]
        if self.options.reduce_zero_label:
            names, rows = names[1:], [tuple(c[1:] for c in row) for row in rows]
        metrics = semseg_metrics([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], names)
        metrics["reduce_zero_label"] = self.options.reduce_zero_label
        for key in ("missing", "unknown_phrases"):
            metrics[key] = int(sum(r[key] for r in records))
        return metrics


class PoseTask(BenchTask):
    """Keypoints: COCO keypoint AP (OKS with per-skeleton sigmas) and PCK@alpha pooled over every ground-truth
    instance, each against the predicted instance matched to it (:func:`match_instances`: by score, then box IoU;
    an unmatched instance's keypoints all count as wrong). All skeletons of the file must have the same number of
    keypoints."""

    name = "pose"
    route_tasks = ("det", "pose")
    max_new_tokens = 512

    def build_dataset(self, path, image_root, templates, mode, **common):
        dataset = CocoKeypointDataset(path, image_root, templates=templates, mode=mode, **common)
        sizes = {len(names) for _, _, names in dataset.skeletons}
        if len(sizes) > 1:
            raise ValueError(f"{path}: keypoint AP needs one skeleton size per file, found sizes {sorted(sizes)}")
        if self.options.sigmas is not None and len(self.options.sigmas) not in sizes:
            raise ValueError(f"--sigmas: {len(self.options.sigmas)} values for {sizes.pop()} keypoints")
        return dataset

    def _mapped(self, dataset: CocoKeypointDataset, skeleton: int,
                out: DecoderPrediction) -> tuple[list[int | None], np.ndarray]:
        """Category id of each object group and the keypoints ``[n, Kp, 3]`` in skeleton order."""
        category, name, names = dataset.skeletons[skeleton]
        keypoints = _array(out.result["keypoints"])  # [n, Kp', 3]
        if out.phrases is None:
            if keypoints.shape[1] != len(names):
                raise ValueError(f"teacher-forced pose: {keypoints.shape[1]} keypoint groups for {len(names)} names")
            return [category], keypoints
        named, ordered = routed_keypoints(out, name, names, self.routes.route_for_task("pose"))
        return [category if ok else None for ok in named], ordered

    def score(self, dataset, index, sample, pred):
        position, skeleton = dataset.items[index]
        image_id = _coco_image_id(dataset, index)
        target = sample.targets[self.decoder()]
        out = _output(pred, self.decoder())
        results: list[dict] = []
        match: list[int | None] = [None] * len(target["boxes"])
        if out is not None:
            cats, keypoints = self._mapped(dataset, skeleton, out)
            result = {"keypoints": keypoints, "scores": out.result["scores"], "labels": out.result["labels"]}
            results = keypoints_to_coco(image_id, result, cats)
            match = match_instances(out.result["boxes"], out.result["scores"], target["boxes"])
        pairs = [[None if j is None else keypoints[j].tolist(), _list(gt_kp), _list(gt_box)]
                 for j, gt_kp, gt_box in zip(match, target["keypoints"], target["boxes"])]
        return {"image_id": image_id, "results": results, "pairs": pairs}

    def aggregate(self, dataset, records):
        gt = load_coco(str(dataset.path))
        ids = sorted({r["image_id"] for r in records})
        results = [x for r in records for x in r["results"]]
        sigmas = self.options.sigmas
        if sigmas is None:
            names = dataset.skeletons[0][2]
            sigmas = keypoint_sigmas(len(names), names).tolist()
        pairs = [p for r in records for p in r["pairs"]]
        alpha = self.options.pck_alpha
        return {"keypoints": coco_eval(gt, results, "keypoints", image_ids=ids, sigmas=sigmas),
                f"PCK@{alpha}": pck([p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs], alpha)}


class VqaTask(BenchTask):
    """VQA accuracy (official normalisation, leave-one-out over the human answers), and per ``question_type`` when
    the records carry one (``accuracy_by_type``)."""

    name = "vqa"
    teacher_forced = False
    max_new_tokens = 10

    def build_dataset(self, path, image_root, templates, mode, **common):
        return VqaDataset(path, image_root, templates=templates, mode=mode, **common)

    def score(self, dataset, index, sample, pred):
        return {"answer": pred.text if pred is not None else "", "answers": dataset.answers(index),
                "type": dataset.question_type(index)}

    def aggregate(self, dataset, records):
        def accuracy(rows: list[dict]) -> float:
            return vqa_accuracy([r["answer"] for r in rows], [r["answers"] for r in rows])

        metrics: dict[str, Any] = {"accuracy": accuracy(records)}
        by_type: dict[str, list[dict]] = {}
        for record in records:
            if record["type"] is not None:
                by_type.setdefault(record["type"], []).append(record)
        if by_type:
            metrics["accuracy_by_type"] = {t: accuracy(rows) for t, rows in sorted(by_type.items())}
        return metrics


class CaptionTask(BenchTask):
    """Captioning: CIDEr (CIDEr-D) and BLEU-4."""

    name = "caption"
    teacher_forced = False
    max_new_tokens = 30

    def build_dataset(self, path, image_root, templates, mode, **common):
        return CaptionDataset(path, image_root, templates=templates, mode=mode, **common)

    def score(self, dataset, index, sample, pred):
        return {"caption": pred.text if pred is not None else "", "references": dataset.references(index)}

    def aggregate(self, dataset, records):
        return dict(caption_metrics([r["caption"] for r in records], [r["references"] for r in records]))


JUDGES = ("clip", "shapes")


class _ImageTask(BenchTask):
    """Generated images, scored by CLIP metrics or by the shapes-world rules (``TaskOptions.judge``)."""

    def check_options(self) -> None:
        if self.options.judge not in JUDGES:
            raise ValueError(f"unknown judge {self.options.judge!r} (known: {list(JUDGES)})")
        if self.options.judge == "clip" and self.options.clip is None:
            raise ValueError(f"task {self.name!r} needs a CLIP model: give --clip-model and --clip-weights "
                             "(or --judge shapes on shapes-world data)")

    def record_field(self, dataset: TaskDataset, index: int, key: str) -> Any:
        """Field ``key`` of the item's record; ``ValueError`` naming the file when it is missing."""
        record = dataset.record(index)
        if key not in record:
            raise ValueError(f"{dataset.path}: record {index} has no {key!r} field (needed by --judge shapes)")
        return record[key]

    def aggregate(self, dataset, records):
        keys = [k for k in records[0] if k != "missing"] if records else []
        metrics = {k: float(np.mean([r[k] for r in records])) for k in keys}
        metrics["missing"] = int(sum(r["missing"] for r in records))
        return metrics


class GenTask(_ImageTask):
    """Text-to-image: CLIP score of the generated image against the caption, or (``judge="shapes"``) the share of
    images whose dominant colour and whose shape class are the caption's (a miss scores 0)."""

    name = "gen"
    route_tasks = ("t2i",)

    def build_dataset(self, path, image_root, templates, mode, **common):
        return TextToImageDataset(path, image_root, templates=templates, mode=mode, **common)

    def score(self, dataset, index, sample, pred):
        out = _output(pred, self.decoder())
        if self.options.judge == "shapes":
            colour, shape = self.record_field(dataset, index, "colour"), self.record_field(dataset, index, "shape")
            if out is None:
                return {"colour_accuracy": 0.0, "shape_accuracy": 0.0, "missing": True}
            return {"colour_accuracy": float(dominant_colour(out.result) == colour),
                    "shape_accuracy": float(shape_class(out.result) == shape), "missing": False}
        if out is None:
            return {"CLIP-score": 0.0, "missing": True}
        caption = sample.targets[self.decoder()]["caption"]
        return {"CLIP-score": clip_score(self.options.clip, [out.result], [caption]), "missing": False}


class EditTask(_ImageTask):
    """Editing: CLIP-I (to the target image), CLIP-T and directional CLIP similarity, or (``judge="shapes"``) the
    share of edits that make the requested change and keep the rest (:func:`~.image_judges.edit_correct`); a miss
    scores 0.

    The text of CLIP-T and of the direction comes from the record: ``output_caption`` (and ``input_caption``) when
    present, else the instruction (see :func:`~vllm2.bench.metrics_clip.edit_metrics`).
    """

    name = "edit"
    route_tasks = ("edit",)

    def build_dataset(self, path, image_root, templates, mode, **common):
        return EditDataset(path, image_root, templates=templates, mode=mode, **common)

    def score(self, dataset, index, sample, pred):
        out = _output(pred, self.decoder())
        if self.options.judge == "shapes":
            expected = self.record_field(dataset, index, "edit")
            correct = out is not None and edit_correct(sample.images[0], out.result, expected)
            return {"edit_accuracy": float(correct), "missing": out is None}
        if out is None:
            return {"CLIP-I": 0.0, "CLIP-T": 0.0, "CLIP-dir": 0.0, "missing": True}
        record = dataset.record(index)
        in_caps = [record["input_caption"]] if "input_caption" in record else None
        out_caps = [record["output_caption"]] if "output_caption" in record else None
        metrics = edit_metrics(self.options.clip, sample.images[:1], [out.result],
                               [sample.targets[self.decoder()]["image"]], [record["instruction"]], in_caps, out_caps)
        return {**metrics, "missing": False}


TASKS: dict[str, type[BenchTask]] = {cls.name: cls for cls in (
    DetectionTask, SegmentationTask, SemsegTask, RecTask, ResTask, PoseTask, VqaTask, CaptionTask, GenTask,
    EditTask)}


def build_task(name: str, options: TaskOptions | None = None) -> BenchTask:
    """The task named ``name`` (one of :data:`TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"unknown benchmark task {name!r} (known: {sorted(TASKS)})")
    return TASKS[name](options)
