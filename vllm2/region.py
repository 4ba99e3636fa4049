"""Region (visual prompt) encoder and the conversion of boxes and points to masks.

A region is a binary mask over the image. The encoder embeds (image, mask) with a small conv stack to the vision
grid, adds it cumulatively to each of the last vision layers, pools each level inside the mask (area-weighted mean
over grid cells: deterministic, no random point sampling) and averages the levels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RegionEncoder", "box_to_mask", "point_to_mask"]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of ``[N, C, H, W]``."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)  # [N, H, W, C]
        return x.permute(0, 3, 1, 2)


class RegionEncoder(nn.Module):
    """Encode region masks into LLM-width embeddings.

    Parameter names follow the official layout (``mask_embedding.{0,1,3,4,6}``, ``up_dim``).

    Args:
        vision_dim: width of the vision features (1024 for CLIP-L).
        llm_dim: LLM width.
        patch_size: vision patch size (the conv stack downsamples by it).
        hidden_dim: width of the middle conv.
    """

    def __init__(self, vision_dim: int, llm_dim: int, patch_size: int, hidden_dim: int = 256) -> None:
        super().__init__()
        if patch_size % 2:
            raise ValueError(f"region encoder needs an even patch size, got {patch_size}")
        half = patch_size // 2
        self.mask_embedding = nn.Sequential(
            nn.Conv2d(4, hidden_dim // 4, kernel_size=half, stride=half),
            LayerNorm2d(hidden_dim // 4),
            nn.GELU(),
            nn.Conv2d(hidden_dim // 4, hidden_dim, kernel_size=2, stride=2),
            LayerNorm2d(hidden_dim),
            nn.GELU(),
            nn.Conv2d(hidden_dim, vision_dim, kernel_size=1),
        )
        self.up_dim = nn.Linear(vision_dim, llm_dim)

    def forward(self, images: torch.Tensor, masks: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Embed ``R`` regions.

        Args:
            images: ``[R, 3, S, S]`` the normalised tile each region lies on.
            masks: ``[R, S, S]`` binary masks at tile resolution.
            levels: ``[R, V, T, C]`` vision features of that tile (last V layers, T = grid cells).
        Returns:
            ``[R, llm_dim]`` region embeddings (``[0, llm_dim]`` when R == 0, still connected to the parameters).
        """
        r, v, t, c = levels.shape
        side = int(round(t**0.5))
        x = torch.cat([images, masks[:, None].to(images.dtype)], 1)  # [R, 4, S, S]
        emb = self.mask_embedding(x)  # [R, C, side, side]
        emb = F.interpolate(emb, size=(side, side), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        feats = levels.to(emb.dtype).cumsum(1) + emb[:, None]  # [R, V, T, C]: m_l = emb + F_1 + ... + F_l
        weights = F.adaptive_avg_pool2d(masks[:, None].to(emb.dtype), side).flatten(1)  # [R, T] area fractions
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-6)
        pooled = (feats * weights[:, None, :, None]).sum(2)  # [R, V, C] mask-weighted mean
        return self.up_dim(pooled.mean(1))  # [R, llm_dim]


def box_to_mask(box: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """Rasterise an xyxy pixel box to a bool ``[H, W]`` mask (at least one pixel)."""
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"region box {box} must satisfy x2 > x1 and y2 > y1")
    mask = np.zeros((height, width), dtype=bool)
    c1, r1 = int(np.clip(np.floor(x1), 0, width - 1)), int(np.clip(np.floor(y1), 0, height - 1))
    c2, r2 = int(np.clip(np.ceil(x2), c1 + 1, width)), int(np.clip(np.ceil(y2), r1 + 1, height))
    mask[r1:r2, c1:c2] = True
    return mask


def point_to_mask(point: tuple[float, float], width: int, height: int, radius: float | None = None) -> np.ndarray:
    """A disc around an (x, y) pixel point; the radius defaults to 2% of the shorter side (at least 1 pixel)."""
    x, y = point
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"region point {point} lies outside the {width}x{height} image")
    radius = radius if radius is not None else max(1.0, 0.02 * min(width, height))
    yy, xx = np.mgrid[:height, :width]
    return (xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= radius**2
