"""``VisionLLMv2Processor``: tokenizer + anyres image processing + conversation template, batch-first.

Text: each conversation is rendered by the template into segments, tokenised segment by segment (labels only on
assistant segments), each ``<image>`` expanded to ``tokens_per_tile * n_tiles`` ``<im_patch>`` ids, route
placeholders excluded from the LM loss. Images: every tile of every image of the batch is stacked into one
``pixel_values`` tensor in text order. Regions: one bool mask per ``<region>`` token, resized onto the global view of
its image (the last tile).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase

from superlink import RouteTable, TextLink, query_position_mask

from .config import VisionConfig, VLLM2Config, config_from_dict, config_to_dict
from .conversation import Turn, get_template
from .images import anyres_tiles, load_image
from .tokenizer import IMAGE_TOKEN, PATCH_TOKEN, REGION_TOKEN, add_special_tokens, load_tokenizer

__all__ = ["VisionLLMv2Processor", "Sample"]

PROCESSOR_FILE = "processor_config.json"
IGNORE_INDEX = -100


@dataclass
class Sample:
    """One conversation with its images (in ``<image>`` order) and region masks (in ``<region>`` order).

    ``regions`` pairs each bool mask ``[H, W]`` (original pixels of its image) with the index of that image.
    """

    turns: list[Turn]
    images: Sequence[Image.Image | str | Path] = ()
    regions: Sequence[tuple[np.ndarray, int]] = ()


class VisionLLMv2Processor:
    """Turns samples into model inputs.

    Args:
        tokenizer: a tokenizer that already holds the special tokens.
        vision: the vision config (tile size, patch size, mode, max tiles, normalisation, pixel limit).
        routes: the route table.
        template: conversation template name.
        text_link: the location and class tokens of text transmission (None: the super link alone); the tokenizer
            must hold its tokens.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vision: VisionConfig, routes: RouteTable,
                 template: str = "vicuna_v1", text_link: TextLink | None = None) -> None:
        self.tokenizer = tokenizer
        self.text_link = text_link
        self.vision = vision
        self.routes = routes
        self.template = get_template(template)
        self.bound = routes.bind(tokenizer.convert_tokens_to_ids)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.patch_token_id = tokenizer.convert_tokens_to_ids(PATCH_TOKEN)
        self.region_token_id = tokenizer.convert_tokens_to_ids(REGION_TOKEN)
        self._mean = torch.tensor(vision.image_mean).view(3, 1, 1)
        self._std = torch.tensor(vision.image_std).view(3, 1, 1)

    # ------------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, cfg: VLLM2Config) -> VisionLLMv2Processor:
        """Build from a project config (tokenizer from ``llm.tokenizer`` or the built-in tiny one)."""
        routes, text_link = cfg.route_table(), cfg.text_link()
        tokenizer = load_tokenizer(*cfg.tokenizer_source(), routes=routes, text_link=text_link)
        return cls(tokenizer, cfg.vision, routes, cfg.llm.template, text_link)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the tokenizer and ``processor_config.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        meta = {"vision": config_to_dict(self.vision), "routes": self.routes.to_config(),
                "template": self.template.name,
                "text_link": dataclasses.asdict(self.text_link) if self.text_link else None}
        (directory / PROCESSOR_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VisionLLMv2Processor:
        """Load a processor written by :meth:`save_pretrained`."""
        path = Path(directory) / PROCESSOR_FILE
        if not path.is_file():
            raise FileNotFoundError(f"processor config {str(path)!r} does not exist")
        meta = json.loads(path.read_text())
        routes = RouteTable.from_config(meta["routes"])
        text_link = TextLink(**meta["text_link"]) if meta.get("text_link") else None
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        add_special_tokens(tokenizer, routes, text_link, where=f"the tokenizer of {str(directory)!r}")
        return cls(tokenizer, config_from_dict(VisionConfig, meta["vision"], "vision"), routes, meta["template"],
                   text_link)

    # ------------------------------------------------------------------------------------------------ images

    @property
    def tokens_per_tile(self) -> int:
        return (self.vision.image_size // self.vision.patch_size) ** 2

    def tiles(self, image: Image.Image) -> list[Image.Image]:
        """The tiles of one image (anyres: grid tiles + thumbnail last; resize: one tile)."""
        size = self.vision.image_size
        if self.vision.image_mode == "anyres":
            return anyres_tiles(image, size, self.vision.max_tiles)
        if self.vision.image_mode == "resize":
            return [image.resize((size, size), Image.BICUBIC)]
        raise ValueError(f"config key vision.image_mode: unknown mode {self.vision.image_mode!r}")

    def pixel_values(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """The normalised tiles of ``images``, image after image: ``[N_tiles, 3, S, S]``."""
        return self._normalise([tile for image in images for tile in self.tiles(self._load(image))])

    def _normalise(self, tiles: list[Image.Image]) -> torch.Tensor:
        arr = np.stack([np.asarray(t, dtype=np.float32) for t in tiles]) / 255.0  # [N, S, S, 3]
        return (torch.from_numpy(arr).permute(0, 3, 1, 2) - self._mean) / self._std  # [N, 3, S, S]

    def _load(self, image: Image.Image | str | Path) -> Image.Image:
        return image if isinstance(image, Image.Image) else load_image(image, self.vision.max_image_pixels)

    # ------------------------------------------------------------------------------------------------ text

    def _encode_turns(self, turns: list[Turn], generation: bool) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        ids: list[int] = [tok.bos_token_id] if tok.bos_token_id is not None else []
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        for text, supervised in self.template.segments(turns, tok.eos_token, add_generation_prompt=generation):
            seg = tok.encode(text, add_special_tokens=False)
            ids += seg
            labels += seg if supervised else [IGNORE_INDEX] * len(seg)
        return ids, labels

    def __call__(
        self,
        samples: Sequence[Sample],
        generation: bool = False,
        padding_side: str | None = None,
        max_length: int | None = None,
    ) -> BatchFeature:
        """Batch samples.

        Args:
            samples: the conversations with their images and regions.
            generation: render an open assistant turn at the end (prompts for ``chat``); defaults to left padding.
            padding_side: "left" or "right" (default: left for generation, right for training).
            max_length: longest allowed sequence; a longer one raises ``ValueError`` naming the sample.
        Returns:
            ``input_ids [B, L]``, ``attention_mask [B, L]``, ``labels [B, L]``, ``pixel_values [N, 3, S, S]`` (N tiles
            of the batch, absent if none), ``image_tiles [n_images]``, ``region_masks [R, S, S]``,
            ``region_tiles [R]`` (index of the tile each region lies on).
        """
        padding_side = padding_side or ("left" if generation else "right")
        seqs, tiles, image_tiles, region_masks, region_tiles = [], [], [], [], []
        for i, sample in enumerate(samples):
            ids, labels = self._encode_turns(list(sample.turns), generation)
            n_image_tokens = ids.count(self.image_token_id)
            if n_image_tokens != len(sample.images):
                raise ValueError(f"sample {i}: {n_image_tokens} {IMAGE_TOKEN} tokens but {len(sample.images)} images")
            n_region_tokens = ids.count(self.region_token_id)
            if n_region_tokens != len(sample.regions):
                raise ValueError(f"sample {i}: {n_region_tokens} {REGION_TOKEN} tokens but {len(sample.regions)} regions")
            last_tile = []
            expanded, expanded_labels = [], []
            images = [self._load(im) for im in sample.images]
            spans = iter(images)
            for tok_id, label in zip(ids, labels):
                if tok_id != self.image_token_id:
                    expanded.append(tok_id)
                    expanded_labels.append(label)
                    continue
                image_tiles_i = self.tiles(next(spans))
                tiles += image_tiles_i
                image_tiles.append(len(image_tiles_i))
                last_tile.append(len(tiles) - 1)
                expanded += [self.patch_token_id] * (self.tokens_per_tile * len(image_tiles_i))
                expanded_labels += [IGNORE_INDEX] * (self.tokens_per_tile * len(image_tiles_i))
            for mask, image_index in sample.regions:
                region_masks.append(self._region_mask(mask, images, image_index, i))
                region_tiles.append(last_tile[image_index])
            if max_length is not None and len(expanded) > max_length:
                raise ValueError(f"sample {i}: {len(expanded)} tokens (images expanded) exceed max_length {max_length}")
            seqs.append((expanded, expanded_labels))
        return self._pad(seqs, tiles, image_tiles, region_masks, region_tiles, padding_side)

    def _region_mask(self, mask: np.ndarray, images: list[Image.Image], image_index: int, sample: int) -> torch.Tensor:
        if not 0 <= image_index < len(images):
            raise ValueError(f"sample {sample}: region refers to image {image_index} but the sample has {len(images)}")
        mask = np.asarray(mask, dtype=bool)
        w, h = images[image_index].size
        if mask.shape != (h, w):
            raise ValueError(f"sample {sample}: region mask shape {mask.shape} != image size (h={h}, w={w})")
        if not mask.any():
            raise ValueError(f"sample {sample}: a region mask is empty")
        size = self.vision.image_size
        resized = F.adaptive_max_pool2d(torch.from_numpy(mask)[None, None].float(), (size, size))  # keeps thin masks
        return resized[0, 0] > 0  # [S, S]

    def _pad(self, seqs, tiles, image_tiles, region_masks, region_tiles, padding_side: str) -> BatchFeature:
        length = max(len(s) for s, _ in seqs)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for b, (ids, lab) in enumerate(seqs):
            span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
            input_ids[b, span] = torch.tensor(ids)
            labels[b, span] = torch.tensor(lab)
            attention_mask[b, span] = 1
        labels[query_position_mask(input_ids, self.bound)] = IGNORE_INDEX
        size = self.vision.image_size
        data: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": self._normalise(tiles) if tiles else torch.zeros(0, 3, size, size),
            "image_tiles": torch.tensor(image_tiles, dtype=torch.long),
            "region_masks": torch.stack(region_masks) if region_masks else torch.zeros(0, size, size, dtype=torch.bool),
            "region_tiles": torch.tensor(region_tiles, dtype=torch.long),
        }
        return BatchFeature(data)
