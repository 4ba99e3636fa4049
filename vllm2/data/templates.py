"""Task templates: the instruction phrasings of every task and the rendering of a record into question, answer and
targets in answer order.

Rendering rules (the official ones, see the reference notes, section 4):

- Every prompt with an image starts with ``<image>\\n``. Categories, keypoint names and regions are comma-joined.
- Each category / expression / region / keypoint name in the answer is followed by its route token and placeholders,
  written ONLY here and only through the route table: ``routes.answer_suffix(routes.route_for_task(task))``.
- Label order: the group index of a category is its position in the answer, the order of the decoder's classes.
- Training (a seeded ``numpy.random.Generator`` is passed in) samples a phrasing per slot; detection samples its
  categories (with probability ``all_categories_prob`` every category, else all positives plus a random number of
  negatives; at most ``max_categories``; shuffled) and pose samples its keypoint names (with probability
  ``all_keypoints_prob`` all of them, else a random subset in skeleton order; targets are remapped to it).
- Evaluation (``rng=None``) uses the FIRST phrasing of every slot, every category in dataset order and every
  keypoint name in skeleton order.

Text transmission (``Templates(..., text=TextLink)``, the v1 baseline) changes three tasks: ``det``, ``rec`` and
``pose`` answers write their targets as class and location tokens instead of route groups (see
:mod:`superlink.text`), and their targets are kept only as ground truth (``Rendered.in_text``). The question of a
det/pose prompt ends with a ``Classes: circle<c0>, square<c1>.`` clause binding names to class tokens; instances
are written in raster order of their boxes (by class first in detection); a pose instance is ``<c0>`` + box then
``<cj>`` + point for each visible keypoint (``j`` its prompt position, 1-based).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from superlink import RouteTable, TextLink

from ..conversation import Turn
from ..tokenizer import IMAGE_TOKEN, MARKER_TOKENS, REGION_TOKEN
from .records import MODES

__all__ = ["CAPTION_PROMPT", "DEFAULT_PHRASINGS", "TEXT_TASKS", "VQA_SUFFIX", "Rendered", "Templates", "region_marker", "to_turns"]

VQA_SUFFIX = "Answer the question using a single word or phrase."  # the VQA benchmarks' prompt suffix
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."  # the caption benchmark's prompt

# Slot name -> phrasings (the first one is the official phrasing, used in evaluation). Fields in braces are filled in.
DEFAULT_PHRASINGS: dict[str, tuple[str, ...]] = {
    "det_question": (
        "Can you analyze the image and identify the {categories} present?",
        "Please detect every object of these categories in the image: {categories}.",
        "Find all instances of {categories} in the picture.",
        "Identify and locate the {categories} in this image.",
    ),
    "det_answer": (
        "Yes, here are the results for {results} in the image.",
        "Sure, here are the detected objects: {results}.",
        "Here are the results for {results}.",
    ),
    "semantic_seg_question": (
        "Could you aid me in generating unique masks for every category present in {categories} in this image?",
        "Please segment every region belonging to {categories} in the image.",
        "Can you produce a semantic segmentation of the image for the categories {categories}?",
    ),
    "grounding_question": (
        "Where can we locate the {expression} in the image?",
        "Can you point out the {expression} in the image?",
        "Please locate the object described as: {expression}.",
        "Which object does the phrase \"{expression}\" refer to?",
    ),
    "grounding_answer": (
        "Yes, it is {results}.",
        "It is here: {results}.",
        "Sure, {results}.",
    ),
    "pose_question": (
        "Can you examine the image and pinpoint the keypoint locations of the {keypoints}?",
        "Please localize these keypoints of each instance: {keypoints}.",
        "Where are the {keypoints} of each instance?",
    ),
    "pose_answer": (
        "Utilizing keypoints detection, the image analysis reveals the location of {results}.",
        "The keypoints are located at {results}.",
    ),
    "interactive_question": (
        "Can you examine the image and segment the corresponding objects denoted as {regions}?",
        "Please segment the objects marked by {regions}.",
        "Segment the objects shown as {regions} in the image.",
    ),
    "interactive_answer": (
        "Sure, these objects are {results}.",
        "Here are the segmented objects: {results}.",
    ),
    "region_caption_question": (
        "Can you provide me with a brief description of {region} in the picture?",
        "What is in {region}?",
        "Describe {region} in a few words.",
    ),
    "t2i_question": (
        "Generate image with caption: {caption}.",
        "Please draw a picture of: {caption}.",
        "Create an image that matches the description: {caption}.",
    ),
    "edit_question": (
        "Edit the image according to the caption: {instruction}.",
        "{instruction}",
        "Please modify the image as follows: {instruction}.",
    ),
    "generation_answer": (
        "Here it is {results}.",
        "Sure, here is the image {results}.",
    ),
}

_FIELDS = {
    "det_question": {"categories"},
    "det_answer": {"results"},
    "semantic_seg_question": {"categories"},
    "grounding_question": {"expression"},
    "grounding_answer": {"results"},
    "pose_question": {"keypoints"},
    "pose_answer": {"results"},
    "interactive_question": {"regions"},
    "interactive_answer": {"results"},
    "region_caption_question": {"region"},
    "t2i_question": {"caption"},
    "edit_question": {"instruction"},
    "generation_answer": {"results"},
}

TEXT_TASKS = ("det", "rec", "pose")  # the tasks whose targets text transmission writes as tokens

_REGION_REF = re.compile(r"<region(\d+)>")


def region_marker(number: int) -> str:
    """The prompt text of region ``number`` (1-based): ``<reg>region1<region></reg>``."""
    return f"<reg>region{number}{REGION_TOKEN}</reg>"


@dataclass
class Rendered:
    """A rendered single-turn task.

    Attributes:
        question: the user turn (with ``<image>\\n`` when the task has an image).
        answer: the canonical assistant answer with route tokens and placeholders.
        targets: decoder name -> raw target, labels in answer order.
        regions: for region tasks, the indices of the candidate regions in ``<region>`` order.
        in_text: the answer writes the targets as text (text transmission): they are ground truth only.
    """

    question: str
    answer: str
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    regions: list[int] = field(default_factory=list)
    in_text: bool = False


def to_turns(rendered: Rendered, mode: str) -> list[Turn]:
    """The conversation of a rendered task: question and answer, or the question alone in ``"question"`` mode."""
    if mode not in MODES:
        raise ValueError(f"unknown rendering mode {mode!r} (known: {list(MODES)})")
    if mode == "question":
        return [("user", rendered.question)]
    return [("user", rendered.question), ("assistant", rendered.answer)]


class Templates:
    """Phrasings and sampling rules of every task, bound to a route table.

    Args:
        routes: the route table; it names the route of each task (``route_for_task``) and its placeholders.
        phrasings: optional slot -> list of phrasings replacing the defaults of those slots (see
            :data:`DEFAULT_PHRASINGS`; each must use the slot's fields).
        max_categories: most categories in one training detection prompt.
        all_categories_prob: probability of prompting every category (capped) in training.
        all_keypoints_prob: probability of prompting every keypoint name in training.
        max_regions: most region prompts in one training interactive-segmentation sample.
        text: text transmission's location and class tokens (None: every task uses the super link).
    """

    def __init__(
        self,
        routes: RouteTable,
        phrasings: Mapping[str, Sequence[str]] | None = None,
        *,
        max_categories: int = 100,
        all_categories_prob: float = 0.5,
        all_keypoints_prob: float = 0.5,
        max_regions: int = 10,
        text: TextLink | None = None,
    ) -> None:
        if max_categories < 1 or max_regions < 1:
            raise ValueError("templates: max_categories and max_regions must be >= 1")
        for name, prob in (("all_categories_prob", all_categories_prob), ("all_keypoints_prob", all_keypoints_prob)):
            if not 0.0 <= prob <= 1.0:
                raise ValueError(f"templates: {name} must lie in [0, 1], got {prob}")
        self.routes = routes
        self.max_categories = max_categories
        self.all_categories_prob = all_categories_prob
        self.all_keypoints_prob = all_keypoints_prob
        self.max_regions = max_regions
        self.text = text
        self.reserved = tuple(t for t in (*MARKER_TOKENS, *routes.route_tokens, *routes.placeholder_tokens)
                              if t != IMAGE_TOKEN) + (text.tokens if text else ())
        self.phrasings = dict(DEFAULT_PHRASINGS)
        for slot, values in (phrasings or {}).items():
            self.phrasings[slot] = self._check_phrasings(slot, values)

    def _check_phrasings(self, slot: str, values: Sequence[str]) -> tuple[str, ...]:
        if slot not in _FIELDS:
            raise KeyError(f"templates: unknown phrasing slot {slot!r} (known: {sorted(_FIELDS)})")
        if isinstance(values, str) or not values:
            raise ValueError(f"templates: phrasings of {slot!r} must be a non-empty list of strings")
        for value in values:
            used = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
            if used != _FIELDS[slot]:
                raise ValueError(f"templates: phrasing {value!r} of {slot!r} must use exactly the fields "
                                 f"{sorted(_FIELDS[slot])}, uses {sorted(used)}")
            self.check_text(value, f"phrasing of {slot!r}")
        return tuple(values)

    # ------------------------------------------------------------------------------------------------ routing

    def suffix(self, task: str) -> str:
        """The route token of ``task`` with its placeholders, from the route table."""
        return self.routes.answer_suffix(self.routes.route_for_task(task))

    def decoder(self, task: str) -> str:
        """The decoder that receives the groups of ``task`` (for pose: the pose route's decoder)."""
        return self.routes.route(self.routes.route_for_task(task)).decoder

    def writes_text(self, task: str) -> bool:
        """Whether ``task``'s answers carry their targets as text (text transmission of det, rec and pose)."""
        return self.text is not None and task in TEXT_TASKS

    @staticmethod
    def _size(task: str, image_size: tuple[int, int] | None) -> tuple[int, int]:
        if image_size is None:
            raise ValueError(f"text transmission of {task!r} needs the image size")
        return image_size

    def phrase(self, slot: str, rng: np.random.Generator | None) -> str:
        """The first phrasing of ``slot`` (evaluation) or a random one (training)."""
        values = self.phrasings[slot]
        return values[0] if rng is None else values[int(rng.integers(len(values)))]

    def check_text(self, text: str, what: str) -> str:
        """Refuse dataset text that contains special tokens (route, placeholder, region or patch markers)."""
        if not isinstance(text, str):
            raise ValueError(f"{what} must be a string, got {type(text).__name__}")
        found = [t for t in self.reserved if t in text]
        if found:
            raise ValueError(f"{what} contains the special token(s) {found}; only the templates write them")
        return text

    # ------------------------------------------------------------------------------------------------ detection

    def select_categories(self, num_categories: int, positives: Sequence[int],
                          rng: np.random.Generator | None) -> list[int]:
        """The categories of one prompt, in prompt (= label) order.

        Args:
            num_categories: size of the vocabulary (categories 0..n-1 in dataset order).
            positives: categories present in the image.
            rng: None in evaluation (every category, dataset order).
        Returns:
            Category indices.
        """
        if rng is None:
            return list(range(num_categories))
        cap = self.max_categories
        pos = sorted({int(c) for c in positives})
        if len(pos) > cap:
            pos = sorted(rng.choice(pos, cap, replace=False).tolist())
        taken = set(pos)
        negatives = [c for c in range(num_categories) if c not in taken]
        room = min(len(negatives), cap - len(pos))
        if rng.random() < self.all_categories_prob:
            count = room
        else:
            count = int(rng.integers(0 if pos else 1, room + 1))
        chosen = pos + rng.choice(negatives, count, replace=False).tolist() if count else pos
        return [int(c) for c in rng.permutation(chosen)]

    def detection(
        self,
        task: str,
        names: Sequence[str],
        categories: np.ndarray,
        boxes: np.ndarray,
        masks: np.ndarray | None,
        rng: np.random.Generator | None,
        image_size: tuple[int, int] | None = None,
    ) -> Rendered:
        """Detection / instance / semantic segmentation.

        Args:
            task: ``"det"``, ``"instance_seg"`` or ``"semantic_seg"``.
            names: category names of the vocabulary, dataset order.
            categories: ``[N]`` vocabulary index of each instance.
            boxes: ``[N, 4]`` xyxy pixels.
            masks: optional ``[N, H, W]`` bool.
            rng: None in evaluation.
            image_size: ``(width, height)``; needed by text transmission.
        Returns:
            The rendered sample; targets keep the instances of prompted categories, labelled by answer position.
        """
        chosen = self.select_categories(len(names), categories.tolist(), rng)
        slot = "semantic_seg_question" if task == "semantic_seg" else "det_question"
        question = self.phrase(slot, rng).format(categories=", ".join(names[c] for c in chosen))
        rank = np.full(len(names), -1, dtype=np.int64)
        rank[chosen] = np.arange(len(chosen))
        labels = rank[categories] if len(categories) else np.zeros(0, dtype=np.int64)  # [N]
        keep = labels >= 0
        target: dict[str, Any] = {"boxes": boxes[keep].astype(np.float32), "labels": labels[keep]}
        if masks is not None:
            target["masks"] = masks[keep]
        if self.writes_text(task):
            width, height = self._size(task, image_size)
            kept, kept_labels = boxes[keep], labels[keep]
            order = np.lexsort((kept[:, 0], kept[:, 1], kept_labels))  # by class, then top, then left
            results = "".join(self.text.cls(int(kept_labels[i])) + self.text.box(kept[i], width, height)
                              for i in order)
            question = f"{question} {self.text.declare([names[c] for c in chosen])}"
        else:
            suffix = self.suffix(task)
            results = ", ".join(f"{names[c]}{suffix}" for c in chosen)
        answer = self.phrase("det_answer", rng).format(results=results)
        return Rendered(f"{IMAGE_TOKEN}\n{question}", answer, {self.decoder(task): target},
                        in_text=self.writes_text(task))

    def grounding(
        self, task: str, expression: str, box: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator | None,
        image_size: tuple[int, int] | None = None,
    ) -> Rendered:
        """Referring expression comprehension (``"rec"``) or segmentation (``"res"``): one group, label 0
        (text transmission: one untagged box; ``image_size`` is ``(width, height)``)."""
        question = self.phrase("grounding_question", rng).format(expression=expression)
        in_text = self.writes_text(task)
        results = self.text.box(box, *self._size(task, image_size)) if in_text else self.suffix(task)
        answer = self.phrase("grounding_answer", rng).format(results=results)
        target: dict[str, Any] = {"boxes": box[None].astype(np.float32), "labels": np.zeros(1, dtype=np.int64)}
        if mask is not None:
            target["masks"] = mask[None]
        return Rendered(f"{IMAGE_TOKEN}\n{question}", answer, {self.decoder(task): target}, in_text=in_text)

    # ------------------------------------------------------------------------------------------------ pose

    def select_keypoints(self, num_keypoints: int, rng: np.random.Generator | None) -> list[int]:
        """Keypoint indices of one prompt in skeleton order: all of them, or (training) a random proper subset."""
        if rng is None or num_keypoints == 1 or rng.random() < self.all_keypoints_prob:
            return list(range(num_keypoints))
        size = int(rng.integers(1, num_keypoints))
        return sorted(rng.choice(num_keypoints, size, replace=False).tolist())

    def pose(
        self,
        object_name: str,
        keypoint_names: Sequence[str],
        boxes: np.ndarray,
        keypoints: np.ndarray,
        areas: np.ndarray,
        rng: np.random.Generator | None,
        dataset: str | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> Rendered:
        """Pose: a detection question for the object class and a keypoint question, one turn.

        The object class is one group on the detection route (label 0); each keypoint name is one group on the pose
        route, in prompt order; ``keypoints`` are remapped to that order and ``keypoint_ids`` gives the skeleton index
        of each. ``dataset`` (OKS sigma lookup) is kept only when the whole skeleton is prompted in order.

        Args:
            object_name: the category name.
            keypoint_names: the skeleton's keypoint names.
            boxes: ``[N, 4]`` xyxy; keypoints: ``[N, Kp, 3]`` (x, y, v); areas: ``[N]``.
            rng: None in evaluation.
            dataset: dataset name for the keypoint decoder's per-dataset sigmas.
            image_size: ``(width, height)``; needed by text transmission.
        """
        chosen = self.select_keypoints(len(keypoint_names), rng)
        question = " ".join([
            self.phrase("det_question", rng).format(categories=object_name),
            self.phrase("pose_question", rng).format(keypoints=", ".join(keypoint_names[k] for k in chosen)),
        ])
        in_text = self.writes_text("pose")
        if in_text:
            question = f"{question} {self.text.declare([object_name, *(keypoint_names[k] for k in chosen)])}"
            answer = self.phrase("pose_answer", rng).format(
                results=self._text_instances(boxes, keypoints[:, chosen], self._size("pose", image_size)))
        else:
            det_suffix, pose_suffix = self.suffix("det"), self.suffix("pose")
            answer = " ".join([
                self.phrase("det_answer", rng).format(results=f"{object_name}{det_suffix}"),
                self.phrase("pose_answer", rng).format(
                    results=", ".join(f"{keypoint_names[k]}{pose_suffix}" for k in chosen)),
            ])
        target: dict[str, Any] = {
            "boxes": boxes.astype(np.float32),
            "labels": np.zeros(len(boxes), dtype=np.int64),
            "keypoints": keypoints[:, chosen].astype(np.float32),  # [N, Kp', 3]
            "areas": areas.astype(np.float32),
            "keypoint_ids": np.asarray(chosen, dtype=np.int64),
        }
        if dataset is not None and chosen == list(range(len(keypoint_names))):
            target["dataset"] = dataset
        return Rendered(f"{IMAGE_TOKEN}\n{question}", answer, {self.decoder("pose"): target}, in_text=in_text)

    def _text_instances(self, boxes: np.ndarray, keypoints: np.ndarray, image_size: tuple[int, int]) -> str:
        """Pose instances as text, raster order: ``<c0>`` + box, then ``<cj>`` + point per visible keypoint.

        Args:
            boxes: ``[N, 4]`` xyxy; keypoints: ``[N, Kp, 3]`` in prompt order.
        """
        width, height = image_size
        parts = []
        for i in np.lexsort((boxes[:, 0], boxes[:, 1])):
            parts.append(self.text.cls(0) + self.text.box(boxes[i], width, height))
            parts += [self.text.cls(j + 1) + self.text.point(x, y, width, height)
                      for j, (x, y, v) in enumerate(keypoints[i]) if v > 0]
        return "".join(parts)

    # ------------------------------------------------------------------------------------------------ regions

    def interactive(self, boxes: np.ndarray, masks: np.ndarray, rng: np.random.Generator | None) -> Rendered:
        """Interactive segmentation: the chosen instances become region prompts ``region1..n`` and answer groups.

        Training picks 1..``max_regions`` instances in random order; evaluation takes all, in order. ``regions`` of
        the result lists the chosen instance indices in prompt order.
        """
        n = len(boxes)
        if n == 0:
            raise ValueError("interactive segmentation needs at least one instance")
        if rng is None:
            order = list(range(n))
        else:
            order = rng.permutation(n)[: int(rng.integers(1, min(n, self.max_regions) + 1))].tolist()
        suffix = self.suffix("interactive")
        question = self.phrase("interactive_question", rng).format(
            regions=", ".join(region_marker(i + 1) for i in range(len(order))))
        answer = self.phrase("interactive_answer", rng).format(
            results=", ".join(f"region{i + 1}{suffix}" for i in range(len(order))))
        target = {"boxes": boxes[order].astype(np.float32), "labels": np.arange(len(order), dtype=np.int64),
                  "masks": masks[order]}
        return Rendered(f"{IMAGE_TOKEN}\n{question}", answer, {self.decoder("interactive"): target}, order)

    def region_caption(self, caption: str, rng: np.random.Generator | None) -> Rendered:
        """Describe one region prompt; the answer is the caption."""
        question = self.phrase("region_caption_question", rng).format(region=region_marker(1))
        return Rendered(f"{IMAGE_TOKEN}\n{question}", self.check_text(caption, "caption"), regions=[0])

    def region_conversation(self, turns: list[Turn], num_regions: int) -> tuple[list[Turn], list[int]]:
        """Expand the ``<regionN>`` references (1-based) of a conversation: region markers in user turns (each one a
        ``<region>`` token), plain ``regionN`` in assistant turns.

        Returns:
            The turns and the region index of every ``<region>`` token in text order.
        """
        order: list[int] = []

        def expand(match: re.Match, role: str) -> str:
            number = int(match.group(1))
            if not 1 <= number <= num_regions:
                raise ValueError(f"conversation refers to <region{number}> but the record has {num_regions} regions")
            if role == "assistant":
                return f"region{number}"
            order.append(number - 1)
            return region_marker(number)

        out = [(role, _REGION_REF.sub(lambda m, r=role: expand(m, r), text)) for role, text in turns]
        if not order:
            raise ValueError("a region conversation must refer to its regions as <region1>, <region2>, ...")
        return out, order

    # ------------------------------------------------------------------------------------------------ chat

    def conversation(self, turns: list[Turn], num_images: int) -> list[Turn]:
        """Check a conversation's text and place its images.

        Without any ``<image>`` in the text, the images go at the start of the first user turn (``<image>\\n`` each);
        otherwise the number of ``<image>`` must equal the number of images.
        """
        turns = [(role, self.check_text(text, f"turn {i} text")) for i, (role, text) in enumerate(turns)]
        count = sum(text.count(IMAGE_TOKEN) for _, text in turns)
        if count == 0 and num_images:
            role, text = turns[0]
            turns[0] = (role, f"{IMAGE_TOKEN}\n" * num_images + text)
        elif count != num_images:
            raise ValueError(f"conversation has {count} {IMAGE_TOKEN} tokens but the record names {num_images} images")
        return turns

    # ------------------------------------------------------------------------------------------------ generation

    def text_to_image(self, caption: str, image: Image.Image, rng: np.random.Generator | None) -> Rendered:
        """Text-to-image: no input image; the target is the image with its caption."""
        caption = self.check_text(caption, "caption")
        question = self.phrase("t2i_question", rng).format(caption=caption.strip().rstrip("."))
        answer = self.phrase("generation_answer", rng).format(results=self.suffix("t2i"))
        return Rendered(question, answer, {self.decoder("t2i"): {"image": image, "caption": caption}})

    def edit(self, instruction: str, output: Image.Image, rng: np.random.Generator | None) -> Rendered:
        """Instruction editing: the input image is the sample's image; the target is the edited image with the
        instruction as its caption (the prompt text of InstructPix2Pix, read by the alignment loss)."""
        instruction = self.check_text(instruction, "instruction")
        question = self.phrase("edit_question", rng).format(instruction=instruction.strip().rstrip("."))
        answer = self.phrase("generation_answer", rng).format(results=self.suffix("edit"))
        target = {"image": output, "caption": instruction}
        return Rendered(f"{IMAGE_TOKEN}\n{question}", answer, {self.decoder("edit"): target})

    # ------------------------------------------------------------------------------------------------ truncation

    def trim(self, task: str, targets: dict[str, dict[str, Any]], kept_groups: int) -> tuple[dict[str, dict], int]:
        """Targets of a sample whose answer keeps only its first ``kept_groups`` route groups.

        Returns:
            The trimmed targets and the number of groups that may stay (smaller than ``kept_groups`` when a partial
            structure cannot be trained: a pose answer keeps its object group only with at least one keypoint).
        """
        if not targets:
            return targets, kept_groups
        if kept_groups <= 0:
            return {}, 0
        if task == "pose":
            name = self.decoder("pose")
            target = targets[name]
            num_keypoints = kept_groups - 1  # one object group, then the keypoint groups
            if num_keypoints < 1:
                return {}, 0
            if num_keypoints >= target["keypoints"].shape[1]:
                return targets, kept_groups
            trimmed = {k: v for k, v in target.items() if k != "dataset"}
            trimmed["keypoints"] = target["keypoints"][:, :num_keypoints]
            trimmed["keypoint_ids"] = target["keypoint_ids"][:num_keypoints]
            return {name: trimmed}, kept_groups
        if task in ("t2i", "edit"):
            return targets, kept_groups
        out = {}
        for name, target in targets.items():
            keep = target["labels"] < kept_groups
            out[name] = {k: (v[keep] if k in ("boxes", "labels", "masks") else v) for k, v in target.items()}
        return out, kept_groups
