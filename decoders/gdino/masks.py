"""Mask head (Mask-DINO style) and point-sampled mask losses.

Mask features: the finest backbone stage (stride 4) goes through a GroupNorm lateral 1x1 convolution, the first level
of the encoder memory (stride 8) is upsampled and added, then a 3x3 convolution (GroupNorm, ReLU) and a 1x1
convolution give ``mask_features`` ``[B, d, H/4, W/4]`` over the padded canvas. A query's mask logits are its mask
embedding (a per-layer MLP on the decoder state) dotted with those features.

Losses (Mask2Former): for each matched (query, target) pair, ``mask_points`` points are drawn by uncertainty sampling
(``oversample_ratio`` x as many random points, the ``importance_ratio`` share with logits closest to 0 kept, the rest
uniform); binary cross-entropy and dice are computed on the logits and the bilinearly sampled target at those points.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvNorm",
    "PixelDecoder",
    "mask_logits_for",
    "point_sample",
    "sigmoid_bce_points",
    "dice_points",
    "uncertain_point_coords",
]


class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by GroupNorm(32) (key layout ``weight``, ``norm.weight``, ``norm.bias``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, relu: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(32, out_channels)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, H, W]`` -> ``[B, C_out, H, W]``."""
        x = self.norm(super().forward(x))
        return F.relu(x) if self.relu else x


class PixelDecoder(nn.Module):
    """Stride-4 mask features from the finest backbone stage and the first encoder level.

    Args:
        finest_channels: channels of the finest backbone stage.
        d_model: transformer width (also the mask embedding width).
    """

    def __init__(self, finest_channels: int, d_model: int) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList([ConvNorm(finest_channels, d_model, 1)])
        self.output_convs = nn.ModuleList([ConvNorm(d_model, d_model, 3, relu=True)])
        self.mask_features = nn.Conv2d(d_model, d_model, 1)

    def forward(self, finest: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Fuse the two scales.

        Args:
            finest: ``[B, C1, H/4, W/4]`` finest backbone stage.
            memory: ``[B, d, H/8, W/8]`` first level of the encoder output.

        Returns:
            ``[B, d, H/4, W/4]`` mask features.
        """
        lateral = self.lateral_convs[0](finest)  # [B, d, H/4, W/4]
        upsampled = F.interpolate(memory, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        return self.mask_features(self.output_convs[0](lateral + upsampled))  # [B, d, H/4, W/4]


def mask_logits_for(
    mask_embeds: torch.Tensor, mask_features: torch.Tensor, batch_idx: torch.Tensor, query_idx: torch.Tensor
) -> torch.Tensor:
    """Mask logits of selected queries only (no ``[B, Q, h, w]`` tensor is built).

    Args:
        mask_embeds: ``[B, Q, d]`` per-query mask embeddings.
        mask_features: ``[B, d, h, w]``.
        batch_idx: ``[N]`` sample of each selected query, sorted ascending.
        query_idx: ``[N]`` query index of each selection.

    Returns:
        ``[N, h, w]`` mask logits.
    """
    batch, dim, height, width = mask_features.shape
    num = batch_idx.numel()
    if num == 0:
        return mask_features.new_zeros(0, height, width)
    counts = torch.bincount(batch_idx, minlength=batch)  # [B]
    starts = counts.cumsum(0) - counts  # [B]
    rank = torch.arange(num, device=batch_idx.device) - starts[batch_idx]  # [N]
    padded = mask_embeds.new_zeros(batch, int(counts.max()), dim)  # [B, n_max, d]
    padded = padded.index_put((batch_idx, rank), mask_embeds[batch_idx, query_idx])
    logits = torch.bmm(padded, mask_features.flatten(2))  # [B, n_max, h*w]
    return logits[batch_idx, rank].view(num, height, width)  # [N, h, w]


def point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample ``maps`` ``[N, H, W]`` at ``coords`` ``[N, P, 2]`` ((x, y) in [0, 1]); returns ``[N, P]``."""
    grid = (2.0 * coords - 1.0).unsqueeze(2)  # [N, P, 1, 2]
    return F.grid_sample(maps.unsqueeze(1), grid, align_corners=False)[:, 0, :, 0]  # [N, P]


@torch.no_grad()
def uncertain_point_coords(
    logits: torch.Tensor, num_points: int, oversample_ratio: float, importance_ratio: float
) -> torch.Tensor:
    """Uncertainty-biased point coordinates for each mask.

    Args:
        logits: ``[N, h, w]`` mask logits.
        num_points: points per mask.
        oversample_ratio: candidates drawn per point (>= 1).
        importance_ratio: share of the points taken among the most uncertain candidates.

    Returns:
        ``[N, num_points, 2]`` coordinates (x, y) in [0, 1].
    """
    num = logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    candidates = torch.rand(num, num_candidates, 2, device=logits.device, dtype=logits.dtype)  # [N, P', 2]
    uncertainty = -point_sample(logits, candidates).abs()  # [N, P']
    num_important = int(importance_ratio * num_points)
    top = uncertainty.topk(num_important, dim=1).indices  # [N, P_imp]
    important = candidates.gather(1, top[..., None].expand(-1, -1, 2))  # [N, P_imp, 2]
    uniform = torch.rand(num, num_points - num_important, 2, device=logits.device, dtype=logits.dtype)
    return torch.cat([important, uniform], dim=1)  # [N, P, 2]


def sigmoid_bce_points(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Mean binary cross-entropy over points, summed over masks, divided by ``num_masks`` (``[N, P]`` inputs)."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # [N, P]
    return loss.mean(1).sum() / num_masks


def dice_points(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Dice loss over points (``1 - (2|p t| + 1) / (|p| + |t| + 1)``), summed over masks / ``num_masks``."""
    probs = logits.sigmoid()  # [N, P]
    numerator = 2 * (probs * targets).sum(1)
    denominator = probs.sum(1) + targets.sum(1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks
