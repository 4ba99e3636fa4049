"""Image and target preprocessing of the keypoint decoder.

Images are resized keeping their aspect ratio, ImageNet-normalised and padded to a common size divisible by
``size_divisor``; ``pixel_mask`` is True on real pixels (it comes from the image extents, never from pixel values).
Targets are normalised by the original image size (aspect-preserving resizing keeps normalised coordinates
unchanged) and padded into batch tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.ops import box_convert
from torchvision.transforms.functional import normalize, pil_to_tensor

from ..base import IMAGENET_MEAN, IMAGENET_STD
from .oks import oks_sigmas

__all__ = ["resized_size", "prepare_images", "prepare_targets"]


def resized_size(width: int, height: int, short_side: int, max_side: int) -> tuple[int, int]:
    """(width, height) after scaling the short side to ``short_side`` with the long side at most ``max_side``."""
    scale = min(short_side / min(width, height), max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def prepare_images(
    images: Sequence[Image.Image], short_side: int, max_side: int, size_divisor: int
) -> dict[str, torch.Tensor]:
    """Resize, normalise and pad a batch of PIL images.

    Returns:
        ``pixel_values`` [B, 3, H, W], ``pixel_mask`` [B, H, W] bool (True = real pixel), ``orig_sizes`` [B, 2] and
        ``image_sizes`` [B, 2] long as (height, width) before and after resizing.
    """
    if len(images) == 0:
        raise ValueError("images must hold at least one image")
    tensors, orig, sizes = [], [], []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"images[{i}] must be a PIL image, got {type(image).__name__}")
        w, h = image.size
        nw, nh = resized_size(w, h, short_side, max_side)
        pixels = pil_to_tensor(image.convert("RGB").resize((nw, nh), Image.BILINEAR)).float() / 255  # [3, h, w]
        tensors.append(normalize(pixels, IMAGENET_MEAN, IMAGENET_STD))
        orig.append((h, w))
        sizes.append((nh, nw))
    pad_h = -(-max(s[0] for s in sizes) // size_divisor) * size_divisor
    pad_w = -(-max(s[1] for s in sizes) // size_divisor) * size_divisor
    pixel_values = torch.zeros(len(images), 3, pad_h, pad_w)  # [B, 3, H, W]
    pixel_mask = torch.zeros(len(images), pad_h, pad_w, dtype=torch.bool)  # [B, H, W]
    for i, (t, (h, w)) in enumerate(zip(tensors, sizes)):
        pixel_values[i, :, :h, :w] = t
        pixel_mask[i, :h, :w] = True
    return {
        "pixel_values": pixel_values,
        "pixel_mask": pixel_mask,
        "orig_sizes": torch.tensor(orig, dtype=torch.long),
        "image_sizes": torch.tensor(sizes, dtype=torch.long),
    }


def _check_target(i: int, target: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate one raw target; returns boxes [N, 4], labels [N], keypoints [N, Kp, 3] as tensors."""
    for key in ("boxes", "labels", "keypoints"):
        if key not in target:
            raise KeyError(f"targets[{i}] lacks {key!r} (pose targets need boxes, labels and keypoints)")
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32)
    labels = torch.as_tensor(target["labels"], dtype=torch.long)
    keypoints = torch.as_tensor(target["keypoints"], dtype=torch.float32)
    n = labels.shape[0] if labels.dim() == 1 else -1
    if boxes.shape != (n, 4):
        raise ValueError(f"targets[{i}]['boxes'] must be [N, 4] with N = len(labels), got {tuple(boxes.shape)}")
    if keypoints.dim() != 3 or keypoints.shape[0] != n or keypoints.shape[2] != 3:
        raise ValueError(f"targets[{i}]['keypoints'] must be [N, Kp, 3], got {tuple(keypoints.shape)}")
    if ((keypoints[..., 2] != 0) & (keypoints[..., 2] != 1) & (keypoints[..., 2] != 2)).any():
        raise ValueError(f"targets[{i}]['keypoints'] visibility must be 0, 1 or 2 (COCO)")
    if (labels < 0).any():
        raise ValueError(f"targets[{i}]['labels'] must be object-group indices >= 0")
    return boxes, labels, keypoints


def prepare_targets(
    targets: Sequence[Mapping[str, Any]],
    orig_sizes: torch.Tensor,
    per_dataset_sigmas: Mapping[str, Sequence[float]] | None = None,
    uniform_sigma: float = 0.05,
) -> dict[str, torch.Tensor]:
    """Normalise and pad raw pose targets (original pixel coordinates) into batch tensors.

    Each target holds ``boxes`` [N, 4] xyxy, ``labels`` [N] (object-group index), ``keypoints`` [N, Kp, 3]
    (x, y, v), optional ``areas`` [N] (pixels^2, default: box areas) and optional ``dataset`` (name used to look up
    OKS sigmas).

    Returns:
        ``boxes`` [B, N, 4] normalised cxcywh (padding: a unit box), ``labels`` [B, N] (-1 on padding),
        ``keypoints`` [B, N, Kp, 3] normalised (x, y) and v, ``instance_mask`` [B, N] bool, ``areas`` [B, N]
        (original pixels^2, 1 on padding), ``num_keypoints`` [B] long, ``sigmas`` [B, Kp] (1 on padding).
    """
    if len(targets) != len(orig_sizes):
        raise ValueError(f"got {len(targets)} targets for {len(orig_sizes)} images")
    checked = [_check_target(i, t) for i, t in enumerate(targets)]
    b = len(targets)
    n_max = max(1, max(labels.shape[0] for _, labels, _ in checked))
    kp_max = max(kpts.shape[1] for _, _, kpts in checked)
    out = {
        "boxes": torch.tensor([0.5, 0.5, 1.0, 1.0]).repeat(b, n_max, 1),  # [B, N, 4]
        "labels": torch.full((b, n_max), -1, dtype=torch.long),  # [B, N]
        "keypoints": torch.zeros(b, n_max, kp_max, 3),  # [B, N, Kp, 3]
        "instance_mask": torch.zeros(b, n_max, dtype=torch.bool),  # [B, N]
        "areas": torch.ones(b, n_max),  # [B, N]
        "num_keypoints": torch.tensor([kpts.shape[1] for _, _, kpts in checked], dtype=torch.long),  # [B]
        "sigmas": torch.ones(b, kp_max),  # [B, Kp]
    }
    for i, (target, (boxes, labels, keypoints)) in enumerate(zip(targets, checked)):
        h, w = orig_sizes[i].tolist()
        n, kp = keypoints.shape[:2]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        areas = target.get("areas")
        areas = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(-1) if areas is None else torch.as_tensor(areas)
        if areas.shape != (n,):
            raise ValueError(f"targets[{i}]['areas'] must be [N], got {tuple(areas.shape)}")
        out["boxes"][i, :n] = box_convert(boxes / scale, "xyxy", "cxcywh")
        out["labels"][i, :n] = labels
        out["keypoints"][i, :n, :kp, :2] = keypoints[..., :2] / scale[:2]
        out["keypoints"][i, :n, :kp, 2] = keypoints[..., 2]
        out["instance_mask"][i, :n] = True
        out["areas"][i, :n] = areas.float()
        out["sigmas"][i, :kp] = oks_sigmas(kp, target.get("dataset"), per_dataset_sigmas, uniform_sigma)
    return out
