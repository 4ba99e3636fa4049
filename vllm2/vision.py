"""Vision towers: transformers ``CLIPVisionModel`` (default, official key layout) or an ``open_clip`` ViT.

Both return, for a batch of tiles, the patch features of ``output_layer`` (CLS dropped) for the LLM and the patch
features of the last ``num_levels`` layers for the region encoder, from ONE forward over every tile of the batch.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from .config import VisionConfig

logger = logging.getLogger(__name__)

OPEN_CLIP_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "open_clip"


class VisionTower(nn.Module):
    """A frozen-or-trainable ViT over ``[N, 3, S, S]`` tiles.

    Args:
        cfg: the vision config.
        num_levels: how many final layers the region encoder reads (0 = none).
    """

    def __init__(self, cfg: VisionConfig, num_levels: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_levels = num_levels
        if cfg.backend == "hf":
            self.vision_model = CLIPVisionModel(
                CLIPVisionConfig(
                    hidden_size=cfg.hidden_size,
                    intermediate_size=cfg.intermediate_size,
                    num_hidden_layers=cfg.num_layers,
                    num_attention_heads=cfg.num_heads,
                    image_size=cfg.image_size,
                    patch_size=cfg.patch_size,
                )
            )
        elif cfg.backend == "open_clip":
            self.visual = _open_clip_visual(cfg, pretrained=None)
        else:
            raise ValueError(f"config key vision.backend: unknown backend {cfg.backend!r} (use 'hf' or 'open_clip')")
        self.set_frozen(cfg.freeze)

    @property
    def tokens_per_tile(self) -> int:
        return (self.cfg.image_size // self.cfg.patch_size) ** 2

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (no gradients, no autograd graph) or unfreeze the tower."""
        self.frozen = frozen
        for p in self.parameters():
            p.requires_grad_(not frozen)

    def load_pretrained(self, path: str, config_key: str = "vision.pretrained") -> None:
        """Load weights from a local CLIP folder (hf) or an open_clip checkpoint file."""
        if not Path(path).exists():
            raise FileNotFoundError(f"vision weights {path!r} (config key {config_key}) do not exist")
        if self.cfg.backend == "hf":
            model = CLIPVisionModel.from_pretrained(path, local_files_only=True)
            self.vision_model.load_state_dict(model.state_dict())
        else:
            self.visual.load_state_dict(_open_clip_visual(self.cfg, pretrained=path).state_dict())
        logger.info("loaded vision tower from %s", path)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode tiles.

        Args:
            pixel_values: ``[N, 3, S, S]`` normalised tiles.
        Returns:
            ``features [N, T, C]`` from ``output_layer`` without CLS, and ``levels [N, num_levels, T, C]`` (the last
            layers, for the region encoder) or None when ``num_levels == 0``.
        """
        with torch.no_grad() if self.frozen else nullcontext():
            hidden = self._hidden_states(pixel_values)  # tuple of [N, 1+T, C]
            features = hidden[self.cfg.output_layer][:, 1:]  # [N, T, C]
            levels = torch.stack([h[:, 1:] for h in hidden[-self.num_levels:]], 1) if self.num_levels else None
        return features, levels

    def _hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.cfg.backend == "hf":
            return self.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        out = self.visual.forward_intermediates(pixel_values, intermediates_only=True, output_fmt="NLC",
                                                output_extra_tokens=True)
        layers = [torch.cat([cls, x], 1) for cls, x in zip(out["image_intermediates_prefix"], out["image_intermediates"])]
        return tuple(layers)


def _open_clip_visual(cfg: VisionConfig, pretrained: str | None) -> nn.Module:
    import open_clip

    if OPEN_CLIP_CONFIG_DIR.is_dir():
        open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)
    if cfg.open_clip_model not in open_clip.list_models():
        raise ValueError(f"config key vision.open_clip_model: unknown open_clip model {cfg.open_clip_model!r}")
    model = open_clip.create_model(cfg.open_clip_model, pretrained=pretrained, force_image_size=cfg.image_size)
    return model.visual
