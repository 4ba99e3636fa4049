"""Image and target preparation for the GroundingDINO decoder.

Images are resized keeping their aspect ratio and normalised by transformers' ``GroundingDinoImageProcessor`` (one
image at a time), then padded at the bottom/right to a common size that is a multiple of ``size_divisor``;
``pixel_mask`` marks the real pixels from the resized sizes (never from pixel values). Targets given in original
pixels become normalised ``(cx, cy, w, h)`` boxes relative to the (unpadded) image, the convention of the model's
box head, and masks are resized and padded onto the batch canvas.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import GroundingDinoImageProcessor
from transformers.image_transforms import corners_to_center_format

from .config import GroundingDinoDecoderConfig

__all__ = ["ImagePreparer"]


class ImagePreparer:
    """Turns original PIL images and raw targets into GroundingDINO inputs.

    Args:
        config: the decoder config (image sizes, normalisation, padding multiple).
    """

    def __init__(self, config: GroundingDinoDecoderConfig) -> None:
        self.size_divisor = config.size_divisor
        self.processor = GroundingDinoImageProcessor(
            size={"shortest_edge": config.image_size, "longest_edge": config.max_image_size},
            do_pad=False,
            image_mean=list(config.image_mean),
            image_std=list(config.image_std),
        )

    def __call__(self, images: list[Any], targets: list[dict] | None = None) -> dict[str, Any]:
        """Prepare a batch.

        Args:
            images: PIL images at their original size.
            targets: optional, one dict per image: ``boxes`` ``[N, 4]`` xyxy pixels, ``labels`` ``[N]`` group indices,
                optional ``masks`` ``[N, H, W]`` bool at the original size.

        Returns:
            ``pixel_values`` ``[B, 3, Hp, Wp]``, ``pixel_mask`` ``[B, Hp, Wp]`` (1 = image), ``image_sizes`` ``[B, 2]``
            (resized h, w), ``orig_sizes`` ``[B, 2]`` (original h, w) and ``targets`` (a list of dicts with
            ``class_labels``, ``boxes`` normalised cxcywh and optional ``masks`` ``[N, Hp, Wp]`` bool) or None.
        """
        if not images:
            raise ValueError("images must not be empty")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"got {len(targets)} targets for {len(images)} images")
        resized = [self._resize(image, i) for i, image in enumerate(images)]
        orig_sizes = torch.tensor([[image.height, image.width] for image in images], dtype=torch.long)  # [B, 2]
        image_sizes = torch.tensor([list(pixels.shape[-2:]) for pixels in resized], dtype=torch.long)  # [B, 2]
        canvas = [self._round_up(int(image_sizes[:, k].max())) for k in (0, 1)]
        pixel_values = torch.zeros(len(images), 3, *canvas)  # [B, 3, Hp, Wp]
        pixel_mask = torch.zeros(len(images), *canvas, dtype=torch.long)  # [B, Hp, Wp]
        for i, pixels in enumerate(resized):
            height, width = pixels.shape[-2:]
            pixel_values[i, :, :height, :width] = pixels
            pixel_mask[i, :height, :width] = 1
        prepared = None
        if targets is not None:
            prepared = [
                prepare_target(target, i, tuple(orig_sizes[i].tolist()), tuple(image_sizes[i].tolist()), tuple(canvas))
                for i, target in enumerate(targets)
            ]
        return {
            "pixel_values": pixel_values,
            "pixel_mask": pixel_mask,
            "image_sizes": image_sizes,
            "orig_sizes": orig_sizes,
            "targets": prepared,
        }

    def _resize(self, image: Any, index: int) -> torch.Tensor:
        """Resize and normalise one image; returns ``[3, h, w]``."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"images[{index}] must be a PIL image, got {type(image).__name__}")
        return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def _round_up(self, size: int) -> int:
        return int(math.ceil(size / self.size_divisor) * self.size_divisor)


def prepare_target(
    target: dict,
    index: int,
    orig_size: tuple[int, int],
    image_size: tuple[int, int],
    canvas: tuple[int, int],
) -> dict[str, torch.Tensor]:
    """Validate one raw target and convert it to the decoder's training format.

    Args:
        target: ``boxes`` xyxy pixels, ``labels``, optional ``masks`` (see :class:`ImagePreparer`).
        index: the sample index (for error messages).
        orig_size: original (h, w).
        image_size: resized (h, w).
        canvas: padded (h, w).

    Returns:
        ``class_labels`` ``[N]`` long, ``boxes`` ``[N, 4]`` normalised cxcywh, optional ``masks`` ``[N, Hp, Wp]`` bool.
    """
    height, width = orig_size
    for key in ("boxes", "labels"):
        if key not in target:
            raise ValueError(f"targets[{index}] has no {key!r}")
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32)
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    labels = torch.as_tensor(target["labels"], dtype=torch.long).reshape(-1)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"targets[{index}]['boxes'] must have shape [N, 4], got {tuple(boxes.shape)}")
    if labels.shape[0] != boxes.shape[0]:
        raise ValueError(f"targets[{index}]['labels'] has {labels.shape[0]} entries for {boxes.shape[0]} boxes")
    if (labels < 0).any():
        raise ValueError(f"targets[{index}]['labels'] must be >= 0 (group indices)")
    if not torch.isfinite(boxes).all() or (boxes[:, 2:] < boxes[:, :2]).any():
        raise ValueError(f"targets[{index}]['boxes'] must be finite xyxy boxes with x2 >= x1 and y2 >= y1")
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes = torch.minimum(boxes.clamp(min=0), scale)  # [N, 4]
    prepared = {"class_labels": labels, "boxes": corners_to_center_format(boxes / scale)}
    if target.get("masks") is not None:
        masks = torch.as_tensor(target["masks"]).bool()
        if masks.shape != (boxes.shape[0], height, width):
            raise ValueError(
                f"targets[{index}]['masks'] must have shape [N, H, W] = {(boxes.shape[0], height, width)}, "
                f"got {tuple(masks.shape)}"
            )
        resized = F.interpolate(masks[None].float(), size=image_size, mode="bilinear", align_corners=False)[0]
        padded = torch.zeros(boxes.shape[0], *canvas, dtype=torch.bool)  # [N, Hp, Wp]
        padded[:, : image_size[0], : image_size[1]] = resized > 0.5
        prepared["masks"] = padded
    return prepared
