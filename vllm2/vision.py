"""Vision towers: transformers ``CLIPVisionModel`` (default, official key layout) or an ``open_clip`` tower (a ViT,
or a CLIP ResNet read at the stage whose stride is ``patch_size``).

Every tower returns, for a batch of tiles, the patch features of ``output_layer`` (CLS dropped) for the LLM and the
patch features of the last ``num_levels`` layers for the region encoder, from ONE forward over every tile of the batch.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from .config import CONFIG_DIR, VisionConfig

logger = logging.getLogger(__name__)

OPEN_CLIP_CONFIG_DIR = CONFIG_DIR / "open_clip"


# CLIP ResNet: stride of each block open_clip's forward_intermediates can return (stem, layer1..layer4)
RESNET_STRIDES = (4, 4, 8, 16, 32)


class VisionTower(nn.Module):
    """A frozen-or-trainable vision tower over ``[N, 3, S, S]`` tiles.

    Args:
        cfg: the vision config.
        num_levels: how many final layers the region encoder reads (0 = none).
        visual: an open_clip image tower to wrap (default: a new one built from ``cfg``); a CLIP ResNet is trimmed
            in place.
    """

    def __init__(self, cfg: VisionConfig, num_levels: int = 3, visual: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_levels = num_levels
        self.resnet_stage: int | None = None  # the block a CLIP ResNet tower is read at
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
            self.visual, self.resnet_stage = _open_clip_tower(visual or create_open_clip(cfg).visual, cfg)
            if self.resnet_stage is not None and (num_levels > 1 or cfg.output_layer not in (0, -1)):
                raise ValueError("a ResNet vision tower has one feature level (the stage at stride vision.patch_size): "
                                 f"vision.output_layer must be -1 (got {cfg.output_layer}) and region.num_levels "
                                 f"at most 1 (got {num_levels})")
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
        self.train(self.training)

    def train(self, mode: bool = True) -> VisionTower:
        """A frozen tower stays in eval mode: its batch-norm statistics and dropout do not change."""
        super().train(mode and not self.frozen)
        self.training = mode
        return self

    def load_pretrained(self, path: str, config_key: str = "vision.pretrained") -> None:
        """Load weights from a local CLIP folder (hf) or an open_clip checkpoint file."""
        if not Path(path).exists():
            raise FileNotFoundError(f"vision weights {path!r} (config key {config_key}) do not exist")
        if self.cfg.backend == "hf":
            model = CLIPVisionModel.from_pretrained(path, local_files_only=True)
            self.vision_model.load_state_dict(model.state_dict())
        else:
            visual, _ = _open_clip_tower(create_open_clip(self.cfg, path).visual, self.cfg)
            self.visual.load_state_dict(visual.state_dict())
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
            hidden = self._hidden_states(pixel_values)  # tuple of [N, T, C]
            features = hidden[self.cfg.output_layer]
            levels = torch.stack(hidden[-self.num_levels:], 1) if self.num_levels else None
        return features, levels

    def _hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The patch tokens ``[N, T, C]`` of every layer the tower exposes, CLS dropped."""
        if self.cfg.backend == "hf":
            hidden = self.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
            return tuple(h[:, 1:] for h in hidden)
        if self.resnet_stage is not None:
            (fmap,) = self.visual.forward_intermediates(pixel_values, indices=[self.resnet_stage], stop_early=True,
                                                       intermediates_only=True)["image_intermediates"]  # [N, C, h, w]
            return (fmap.flatten(2).transpose(1, 2),)
        return tuple(self.visual.forward_intermediates(pixel_values, intermediates_only=True,
                                                       output_fmt="NLC")["image_intermediates"])


def create_open_clip(cfg: VisionConfig, pretrained: str | None = None) -> nn.Module:
    """The whole open_clip model ``vision.open_clip_model`` (the configs of ``configs/open_clip`` registered), with
    the checkpoint file ``pretrained`` loaded strictly by open_clip when given."""
    import open_clip

    if OPEN_CLIP_CONFIG_DIR.is_dir():
        open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)
    if cfg.open_clip_model not in open_clip.list_models():
        raise ValueError(f"config key vision.open_clip_model: unknown open_clip model {cfg.open_clip_model!r}")
    device = torch.empty(0).device  # "meta" while transformers' from_pretrained builds the model: keep it there
    quiet = _NoRandomInitWarning() if pretrained is None else None  # the weights come later (a model folder)
    if quiet:
        logging.getLogger().addFilter(quiet)
    try:
        return open_clip.create_model(cfg.open_clip_model, pretrained=pretrained, force_image_size=cfg.image_size,
                                      device=device)
    finally:
        if quiet:
            logging.getLogger().removeFilter(quiet)


class _NoRandomInitWarning(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly" warning, which is wrong when the
    tower's weights are loaded right after it is built (from a model folder or ``vision.pretrained``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _open_clip_tower(visual: nn.Module, cfg: VisionConfig) -> tuple[nn.Module, int | None]:
    """An open_clip image tower as the LLM reads it, and for a CLIP ResNet the block read at stride ``patch_size``
    (the tower trimmed after it); None for a ViT."""
    from open_clip.modified_resnet import ModifiedResNet

    if not isinstance(visual, ModifiedResNet):
        return visual, None
    stage = _resnet_stage(cfg.patch_size)
    _trim_resnet(visual, stage, cfg)
    return visual, stage


def _resnet_stage(patch_size: int) -> int:
    """The last block of a CLIP ResNet whose output stride is ``patch_size`` (1-4: layer1-layer4)."""
    if patch_size not in RESNET_STRIDES:
        raise ValueError(f"config key vision.patch_size: a ResNet tower has strides {sorted(set(RESNET_STRIDES))}, "
                         f"got {patch_size}")
    return max(i for i, s in enumerate(RESNET_STRIDES) if s == patch_size)


def _trim_resnet(visual: nn.Module, stage: int, cfg: VisionConfig) -> None:
    """Drop the attention pool and the stages after ``stage`` (their weights would never train), and check the
    stage's width against ``vision.hidden_size``."""
    visual.attnpool = nn.Identity()
    for k in range(stage + 1, 5):
        setattr(visual, f"layer{k}", nn.Identity())
    width = getattr(visual, f"layer{stage}")[-1].conv3.out_channels
    if width != cfg.hidden_size:
        raise ValueError(f"config key vision.hidden_size: {cfg.hidden_size}, but the ResNet stage at stride "
                         f"{cfg.patch_size} of {cfg.open_clip_model!r} has {width} channels")
