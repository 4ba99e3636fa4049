"""Configuration of the keypoint decoder behind ``[POSE]``.

The defaults are the official 7B dimensions (UniPose with a Swin-T backbone: d_model 256, 900 queries, 6 encoder and
6 decoder layers, 4 feature levels, 50 pose instances, up to 68 keypoints). The small values used in the CPU tests
are the ``decoders.keypoint`` section of ``configs/tiny.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["KeypointDecoderConfig"]


@dataclass
class KeypointDecoderConfig:
    """Keypoint decoder settings.

    Backbone (built from a transformers config with ``AutoBackbone``; stages 2-4 feed the transformer, one extra
    stride-2 convolution adds the fourth level):
        backbone_type: ``"swin"`` or ``"resnet"``.
        backbone_pretrained: optional local folder holding a transformers checkpoint of the backbone (e.g. a
            ``SwinForImageClassification`` folder), read by ``KeypointDecoder.load_pretrained``; the constructor
            builds the backbone from the sizes below and never reads it.
        backbone_embed_dim: Swin ``embed_dim`` / ResNet stem width; stage widths are ``embed_dim * 2**i`` (ResNet) or
            set by Swin itself.
        backbone_depths, backbone_num_heads, backbone_window_size: Swin/ResNet stage layout.

    Transformer:
        d_model, num_heads, num_points, ffn_dim, dropout, num_feature_levels, num_encoder_layers,
        num_decoder_layers: deformable DETR sizes.
        num_box_decoder_layers: decoder layers that refine instance boxes before the pose stage (< num_decoder_layers).
        num_queries: instance queries selected from the encoder proposals (two-stage, mixed query selection).
        num_pose_queries: instances kept after the box stage; each expands into 1 box + Kp keypoint queries.
        max_keypoints: most [POSE] groups (keypoint names) one sample may carry.
        max_object_groups: most [DET] groups (object classes) one sample may carry.
        keypoint_ref_size: size of a keypoint query's reference box (deformable sampling extent) as a fraction of its
            instance box.
        projection_hidden_dim: hidden width of the two query projections from the LLM width.

    Images: resized keeping the aspect ratio so that the short side is ``image_size`` and the long side at most
    ``max_image_size``, ImageNet-normalised, padded to a multiple of ``size_divisor``.

    Matching costs and loss weights (the keypoint L1 and OKS terms each use their own weight):
        cost_class, cost_bbox, cost_giou, cost_keypoint, cost_oks; loss_class, loss_bbox, loss_giou,
        loss_keypoint, loss_oks, loss_visibility; focal_alpha, focal_gamma.

    OKS sigmas: ``oks_sigmas`` maps a dataset name (a target's ``"dataset"`` key) to per-keypoint sigmas; otherwise
    17-keypoint skeletons use the COCO sigmas and any other skeleton ``uniform_oks_sigma`` for every keypoint.
    """

    backbone_type: str = "swin"
    backbone_pretrained: str | None = None
    backbone_embed_dim: int = 96
    backbone_depths: tuple[int, ...] = (2, 2, 6, 2)
    backbone_num_heads: tuple[int, ...] = (3, 6, 12, 24)
    backbone_window_size: int = 7

    d_model: int = 256
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 2048
    dropout: float = 0.0
    num_feature_levels: int = 4
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    num_box_decoder_layers: int = 2
    num_queries: int = 900
    num_pose_queries: int = 50
    max_keypoints: int = 68
    max_object_groups: int = 100
    keypoint_ref_size: float = 0.1
    projection_hidden_dim: int = 256

    image_size: int = 800
    max_image_size: int = 1333
    size_divisor: int = 32

    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    cost_keypoint: float = 10.0
    cost_oks: float = 4.0
    loss_class: float = 2.0
    loss_bbox: float = 5.0
    loss_giou: float = 2.0
    loss_keypoint: float = 10.0
    loss_oks: float = 4.0
    loss_visibility: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0

    oks_sigmas: dict[str, list[float]] = field(default_factory=dict)
    uniform_oks_sigma: float = 0.05

    def __post_init__(self) -> None:
        if self.backbone_type not in ("swin", "resnet"):
            raise ValueError(f"keypoint.backbone_type must be 'swin' or 'resnet', got {self.backbone_type!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"keypoint.d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})")
        if not 0 <= self.num_box_decoder_layers < self.num_decoder_layers:
            raise ValueError(
                f"keypoint.num_box_decoder_layers must lie in [0, num_decoder_layers={self.num_decoder_layers}), "
                f"got {self.num_box_decoder_layers}"
            )
        if self.num_pose_queries > self.num_queries:
            raise ValueError(
                f"keypoint.num_pose_queries ({self.num_pose_queries}) exceeds num_queries ({self.num_queries})"
            )
        if self.num_feature_levels < 3:
            raise ValueError(f"keypoint.num_feature_levels must be >= 3 (backbone stages 2-4), got "
                             f"{self.num_feature_levels}")

    @property
    def pretrained_path(self) -> str | None:
        """The folder ``KeypointDecoder.load_pretrained`` reads (the backbone's), under the name the other decoders'
        configs give theirs."""
        return self.backbone_pretrained
