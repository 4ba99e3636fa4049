"""Configuration of the GroundingDINO decoder behind ``[DET]``, ``[SEG]`` and ``[GRD]``.

The defaults are the official 7B dimensions (transformers' grounding-dino-tiny: Swin-T backbone, d_model 256, 900
queries, 6 encoder and 6 decoder layers, 4 feature levels, 4 sampling points, text length 256; the super-link
projection 4096 -> 256 -> 256 -> 256). The small values used in the CPU tests are the ``decoders.gdino`` section of
``configs/tiny.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..base import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["GroundingDinoDecoderConfig"]



@dataclass
class GroundingDinoDecoderConfig:
    """GroundingDINO decoder settings.

    Backbone (transformers ``AutoBackbone``; stage 1 feeds the mask head, stages 2-4 the transformer, one extra
    stride-2 convolution adds the fourth level):
        backbone_type: ``"swin"`` or ``"resnet"``.
        backbone_embed_dim: Swin ``embed_dim`` / ResNet stem width (ResNet stage widths are ``embed_dim * 2**i``).
        backbone_depths, backbone_num_heads, backbone_window_size: Swin/ResNet stage layout (heads and window: Swin).
        freeze_backbone: keep the backbone weights fixed.

    Transformer (transformers ``GroundingDinoConfig``):
        d_model (a multiple of 32), num_heads, num_points, ffn_dim, dropout, fusion_droppath, num_feature_levels,
        num_encoder_layers, num_decoder_layers, num_queries (at most the number of image tokens).
        max_text_len: text length of the fusion layers. Categories take one text position each plus two
            delimiter positions, so one pass scores ``max_text_len - 2`` categories; more are split into chunks.

    Super link: ``projection_hidden_dim`` and ``projection_layers`` size ``patch2query`` (LLM width -> d_model).

    Images: resized keeping the aspect ratio so that the short side is ``image_size`` and the long side at most
    ``max_image_size``, normalised with ``image_mean``/``image_std``, padded to a multiple of ``size_divisor``.

    Matching costs and loss weights (applied to the final, auxiliary and encoder-proposal outputs):
        cost_class, cost_bbox, cost_giou; loss_class (focal), loss_bbox (L1), loss_giou, loss_mask (point BCE),
        loss_dice; focal_alpha; aux_loss, enc_loss switch the auxiliary decoder-layer and encoder-proposal terms.
        mask_points, mask_oversample_ratio, mask_importance_ratio: uncertainty point sampling of the mask losses.

    Inference: ``topk`` detections per sample, ``score_threshold``, ``mask_threshold`` (on the sigmoid),
    ``return_masks`` (instance masks in ``predict``), ``semantic_threshold`` (a pixel of a semantic map whose best
    class score, summed over the queries, is lower is background).

    pretrained_path: optional local folder with transformers GroundingDINO weights (``load_pretrained``).
    """

    backbone_type: str = "swin"
    backbone_embed_dim: int = 96
    backbone_depths: tuple[int, ...] = (2, 2, 6, 2)
    backbone_num_heads: tuple[int, ...] = (3, 6, 12, 24)
    backbone_window_size: int = 7
    freeze_backbone: bool = False

    d_model: int = 256
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 2048
    dropout: float = 0.0
    fusion_droppath: float = 0.1
    num_feature_levels: int = 4
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    num_queries: int = 900
    max_text_len: int = 256

    projection_hidden_dim: int = 256
    projection_layers: int = 3

    image_size: int = 800
    max_image_size: int = 1333
    size_divisor: int = 32
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD

    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    loss_class: float = 2.0
    loss_bbox: float = 5.0
    loss_giou: float = 2.0
    loss_mask: float = 5.0
    loss_dice: float = 5.0
    focal_alpha: float = 0.25
    aux_loss: bool = True
    enc_loss: bool = True
    mask_points: int = 12544
    mask_oversample_ratio: float = 3.0
    mask_importance_ratio: float = 0.75

    topk: int = 100
    score_threshold: float = 0.0
    mask_threshold: float = 0.5
    semantic_threshold: float = 0.2
    return_masks: bool = True

    pretrained_path: str | None = None

    def __post_init__(self) -> None:
        if self.backbone_type not in ("swin", "resnet"):
            raise ValueError(f"gdino.backbone_type must be 'swin' or 'resnet', got {self.backbone_type!r}")
        if self.d_model % 32:
            raise ValueError(f"gdino.d_model must be a multiple of 32 (GroupNorm groups), got {self.d_model}")
        if self.d_model % self.num_heads:
            raise ValueError(f"gdino.d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})")
        if self.max_text_len < 3:
            raise ValueError(f"gdino.max_text_len must be >= 3 (one category plus two delimiters), got "
                             f"{self.max_text_len}")
        if self.num_feature_levels < 3:
            raise ValueError(f"gdino.num_feature_levels must be >= 3 (backbone stages 2-4), got "
                             f"{self.num_feature_levels}")
        if not 0.0 <= self.mask_importance_ratio <= 1.0 or self.mask_oversample_ratio < 1.0:
            raise ValueError("gdino.mask_importance_ratio must lie in [0, 1] and mask_oversample_ratio be >= 1")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("gdino.image_mean and gdino.image_std must have 3 values")

    @property
    def max_categories(self) -> int:
        """Categories scored in one pass (the rest go to further chunks)."""
        return self.max_text_len - 2
