"""The collator: a list of :class:`~vllm2.data.records.TaskSample` (any mix of tasks) to one model batch.

The text, images and regions go through the processor (right padding); the raw targets are grouped per decoder as
``decoder_inputs = {name: {"batch_index": LongTensor [B_d], "images": [PIL | None], "targets": [dict]}}`` in batch
order, the convention of ``VisionLLMv2Model.forward``. A decoder's image is the sample's first image (None for a
sample without images, e.g. text-to-image). Targets stay numpy arrays / PIL images: a trainer that moves tensors to
the device (or casts them to bf16) leaves them alone, and each decoder's ``prepare`` converts them. Targets a
text-transmission answer writes as tokens (``TaskSample.in_text``) are trained by the LM loss alone and reach no
decoder.

Samples that are ``None`` (bad records skipped by the dataset) are dropped and counted in :attr:`Collator.dropped`.

Length: a sample longer than ``max_length`` (images expanded) raises naming its source. With ``truncate=True`` it is
cut on the right instead, under three rules: never inside an image's patch span or before a region token (the cut
must come after the last of them, else it raises); never inside a route group (``superlink.truncate_ids``); and the
targets of the dropped groups are dropped too (a pose answer keeps its object group only with at least one keypoint
group, otherwise the cut moves before it).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from superlink import truncate_ids

from ..processor import IGNORE_INDEX, Sample, VisionLLMv2Processor
from ..tokenizer import PATCH_TOKEN, REGION_TOKEN
from .records import TaskSample
from .templates import Templates

logger = logging.getLogger(__name__)

__all__ = ["Collator"]


class Collator:
    """Batch task samples for :class:`~vllm2.modeling.VisionLLMv2Model`.

    Args:
        processor: the processor (tokenizer, image tiling, route table).
        max_length: longest allowed sample in tokens with images expanded (None: no limit).
        truncate: cut over-long samples (see the module docstring) instead of raising.
        templates: the templates that rendered the samples (their route table trims targets on truncation);
            default: templates on the processor's route table.
    """

    def __init__(self, processor: VisionLLMv2Processor, max_length: int | None = None, truncate: bool = False,
                 templates: Templates | None = None) -> None:
        self.processor = processor
        self.max_length = max_length
        self.truncate = truncate
        self.templates = templates or Templates(processor.routes)
        self.bound = processor.bound
        tokenizer = processor.tokenizer
        self.protected_ids = torch.tensor([tokenizer.convert_tokens_to_ids(PATCH_TOKEN),
                                           tokenizer.convert_tokens_to_ids(REGION_TOKEN)])
        table = processor.routes
        self.route_decoders = [route.decoder for route in table.routes]
        index = {route.token: i for i, route in enumerate(table.routes)}
        self.absorber = [-1] * len(table.routes)
        for route in table.routes:
            for token in route.absorbs:
                self.absorber[index[token]] = index[route.token]
        self.dropped = 0

    def __call__(self, samples: Sequence[TaskSample | None]) -> dict[str, Any]:
        """Collate a micro-batch.

        Returns:
            The processor's outputs (``input_ids``, ``attention_mask``, ``labels`` ``[B, L]``, ``pixel_values``,
            ``image_tiles``, ``region_masks``, ``region_tiles``) and ``decoder_inputs``.
        """
        kept = [s for s in samples if s is not None]
        self.dropped += len(samples) - len(kept)
        if not kept:
            raise ValueError(f"all {len(samples)} samples of the batch are skipped bad records; nothing to collate")
        for sample in kept:
            if not sample.turns or sample.turns[-1][0] != "assistant":
                raise ValueError(f"{sample.source}: the conversation ends without an answer (question mode); "
                                 "use processor(..., generation=True) for prompts")
        batch = self._process(kept)
        targets = [{} if s.in_text else s.targets for s in kept]
        if self.max_length is not None:
            targets = self._fit(batch, kept, targets)
        self._check_routes(batch["input_ids"], kept, targets)
        batch["decoder_inputs"] = _decoder_inputs(kept, targets)
        return batch

    # ------------------------------------------------------------------------------------------------ steps

    def _process(self, kept: list[TaskSample]) -> dict[str, Any]:
        """Run the processor; an error is re-raised naming the source of the sample that causes it."""
        samples = [Sample(s.turns, s.images, s.regions) for s in kept]
        try:
            return dict(self.processor(samples, padding_side="right"))
        except ValueError:
            for task_sample, sample in zip(kept, samples):
                try:
                    self.processor([sample], padding_side="right")
                except ValueError as err:
                    raise ValueError(f"{task_sample.source}: {err}") from err
            raise

    def _fit(self, batch: dict[str, Any], kept: list[TaskSample], targets: list[dict]) -> list[dict]:
        """Enforce ``max_length`` on the (right-padded) batch in place; returns the targets left."""
        mask = batch["attention_mask"]  # [B, L]
        lengths = mask.sum(1)  # [B]
        over = (lengths > self.max_length).nonzero().squeeze(1).tolist()
        if not over:
            return targets
        if not self.truncate:
            sample = kept[over[0]]
            raise ValueError(f"{sample.source}: {int(lengths[over[0]])} tokens (images expanded) exceed max_length "
                             f"{self.max_length}; raise the limit or enable truncation")
        targets = list(targets)
        for b in over:
            ids = batch["input_ids"][b, : int(lengths[b])]  # [n]
            cut, targets[b] = self._truncate(ids, kept[b])
            batch["input_ids"][b, cut:] = self.processor.tokenizer.pad_token_id
            batch["labels"][b, cut:] = IGNORE_INDEX
            mask[b, cut:] = 0
        length = int(mask.sum(1).max())
        for key in ("input_ids", "labels", "attention_mask"):
            batch[key] = batch[key][:, :length].contiguous()
        return targets

    def _truncate(self, ids: torch.Tensor, sample: TaskSample) -> tuple[int, dict]:
        """Where to cut one sample and its remaining targets."""
        protected = torch.isin(ids, self.protected_ids).nonzero()  # [P, 1]
        floor = int(protected[-1, 0]) + 1 if len(protected) else 0
        ids_list = ids.tolist()
        result = truncate_ids(ids_list, self.max_length, self.bound)
        cut = len(result.ids)
        targets, kept_groups = self.templates.trim(sample.task, sample.targets, result.kept_groups)
        if kept_groups < result.kept_groups:
            cut = [i for i, t in enumerate(ids_list) if t in self.bound.k_by_id][kept_groups]
        if cut < floor:
            raise ValueError(f"{sample.source}: {len(ids_list)} tokens exceed max_length {self.max_length} and the "
                             "cut would fall inside an image or before a region prompt")
        if kept_groups < result.kept_groups + result.dropped_groups:
            logger.debug("%s: truncated to %d tokens, %d route groups left", sample.source, cut, kept_groups)
        return cut, targets

    def _check_routes(self, input_ids: torch.Tensor, kept: list[TaskSample], targets: list[dict]) -> None:
        """Each sample's route groups must reach exactly the decoders it has targets for."""
        route = self.bound.route_index(input_ids)  # [B, L]
        present = torch.zeros(len(kept), len(self.route_decoders), dtype=torch.bool)  # [B, R]
        rows, cols = (route >= 0).nonzero(as_tuple=True)
        present[rows, route[rows, cols]] = True
        for b, sample in enumerate(kept):
            routes = set(present[b].nonzero().squeeze(1).tolist())
            decoders = {self.route_decoders[a if a in routes else r]
                        for r, a in ((r, self.absorber[r]) for r in routes)}
            if decoders != set(targets[b]):
                raise ValueError(f"{sample.source}: the answer routes to decoders {sorted(decoders)} but the sample "
                                 f"has targets for {sorted(targets[b])}")


def _decoder_inputs(kept: list[TaskSample], targets: list[dict]) -> dict[str, dict[str, Any]]:
    """Group targets per decoder in batch order (the model's ``decoder_inputs``)."""
    out: dict[str, dict[str, Any]] = {}
    for b, (sample, sample_targets) in enumerate(zip(kept, targets)):
        for name, target in sample_targets.items():
            entry = out.setdefault(name, {"batch_index": [], "images": [], "targets": []})
            entry["batch_index"].append(b)
            entry["images"].append(sample.images[0] if sample.images else None)
            entry["targets"].append(target)
    for entry in out.values():
        entry["batch_index"] = torch.tensor(entry["batch_index"], dtype=torch.long)  # [B_d]
    return out
