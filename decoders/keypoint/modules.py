"""Building blocks of the keypoint decoder: backbone, multi-scale neck, decoder layer and contrastive class head.

Multi-scale deformable attention and the encoder layer are transformers' Deformable DETR modules (pure PyTorch
``grid_sample`` path; no custom CUDA op).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoBackbone, AutoConfig, DeformableDetrConfig, ResNetConfig, SwinConfig
from transformers.models.deformable_detr.modeling_deformable_detr import (
    DeformableDetrMultiscaleDeformableAttention,
    DeformableDetrSinePositionEmbedding,
)

from .config import KeypointDecoderConfig

__all__ = [
    "build_backbone",
    "load_backbone",
    "deformable_config",
    "init_deformable_attention",
    "MultiScaleNeck",
    "PoseDecoderLayer",
    "ContrastiveClassHead",
]


BACKBONE_STAGES = ["stage2", "stage3", "stage4"]


def build_backbone(cfg: KeypointDecoderConfig) -> nn.Module:
    """Build the randomly initialised image backbone (stages 2-4 as outputs) of ``cfg``'s sizes (Swin-T by default)
    with transformers ``AutoBackbone``; :func:`load_backbone` fills it from a local folder."""
    if cfg.backbone_type == "swin":
        config = SwinConfig(
            embed_dim=cfg.backbone_embed_dim,
            depths=list(cfg.backbone_depths),
            num_heads=list(cfg.backbone_num_heads),
            window_size=cfg.backbone_window_size,
            out_features=BACKBONE_STAGES,
        )
    else:
        config = ResNetConfig(
            embedding_size=cfg.backbone_embed_dim,
            hidden_sizes=[cfg.backbone_embed_dim * 2**i for i in range(4)],
            depths=list(cfg.backbone_depths),
            layer_type="basic",
            out_features=BACKBONE_STAGES,
        )
    return AutoBackbone.from_config(config)


def load_backbone(backbone: nn.Module, path: str) -> None:
    """Load a local transformers checkpoint of the backbone's family (a Swin or ResNet folder as saved by any of its
    model classes, e.g. ``SwinForImageClassification``) into ``backbone``; the architecture must match.

    The stage norms of a Swin backbone are not in a classification checkpoint: they keep their initialisation.
    (``AutoBackbone.from_pretrained`` cannot read a local folder in transformers 5: it asks the Hub whether the path
    is a repository, so the backbone class is used directly.)
    """
    field = "keypoint.backbone_pretrained"
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{field}: no backbone folder (with config.json) at {str(folder)!r}")
    kind = AutoConfig.from_pretrained(folder, local_files_only=True).model_type
    if kind != backbone.config.model_type:
        raise ValueError(f"{field}: {str(folder)!r} holds a {kind!r} model, but keypoint.backbone_type builds a "
                         f"{backbone.config.model_type!r} backbone")
    loaded = type(backbone).from_pretrained(folder, out_features=BACKBONE_STAGES, local_files_only=True)
    try:
        backbone.load_state_dict(loaded.state_dict())
    except RuntimeError as error:
        raise ValueError(f"{field}: {str(folder)!r} does not fit the backbone built from keypoint.backbone_* "
                         f"sizes: {error}") from None


def deformable_config(cfg: KeypointDecoderConfig) -> DeformableDetrConfig:
    """The Deformable DETR config that sizes transformers' deformable attention and encoder layers."""
    return DeformableDetrConfig(
        d_model=cfg.d_model,
        encoder_attention_heads=cfg.num_heads,
        decoder_attention_heads=cfg.num_heads,
        encoder_n_points=cfg.num_points,
        decoder_n_points=cfg.num_points,
        encoder_ffn_dim=cfg.ffn_dim,
        decoder_ffn_dim=cfg.ffn_dim,
        num_feature_levels=cfg.num_feature_levels,
        dropout=cfg.dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        activation_function="relu",
        use_pretrained_backbone=False,
    )


@torch.no_grad()
def init_deformable_attention(module: DeformableDetrMultiscaleDeformableAttention) -> None:
    """Deformable DETR initialisation: sampling offsets on rings around the reference, uniform attention."""
    nn.init.zeros_(module.sampling_offsets.weight)
    thetas = torch.arange(module.n_heads, dtype=torch.float32) * (2.0 * math.pi / module.n_heads)  # [H]
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # [H, 2]
    grid = (grid / grid.abs().max(-1, keepdim=True).values).view(module.n_heads, 1, 1, 2)
    grid = grid.repeat(1, module.n_levels, module.n_points, 1)  # [H, L, P, 2]
    grid *= torch.arange(1, module.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
    module.sampling_offsets.bias.copy_(grid.flatten())
    nn.init.zeros_(module.attention_weights.weight)
    nn.init.zeros_(module.attention_weights.bias)
    nn.init.xavier_uniform_(module.value_proj.weight)
    nn.init.zeros_(module.value_proj.bias)
    nn.init.xavier_uniform_(module.output_proj.weight)
    nn.init.zeros_(module.output_proj.bias)


class MultiScaleNeck(nn.Module):
    """Backbone maps (strides 8/16/32) plus extra stride-2 convolutions -> ``num_feature_levels`` maps of width d.

    Args:
        in_channels: channels of the three backbone outputs.
        d_model: output width.
        num_levels: number of output levels (>= 3).
    """

    def __init__(self, in_channels: list[int], d_model: int, num_levels: int) -> None:
        super().__init__()
        groups = math.gcd(32, d_model)
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d_model, 1), nn.GroupNorm(groups, d_model)) for c in in_channels
        )
        extra_in = [in_channels[-1]] + [d_model] * (num_levels - len(in_channels) - 1)
        self.extra = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d_model, 3, stride=2, padding=1), nn.GroupNorm(groups, d_model))
            for c in extra_in
        )
        self.position = DeformableDetrSinePositionEmbedding(d_model // 2, normalize=True)
        for conv in [m[0] for m in self.lateral] + [m[0] for m in self.extra]:
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)

    def forward(
        self, feature_maps: list[torch.Tensor], pixel_mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Returns per level the features [B, d, h, w], masks [B, h, w] (True = real) and sine positions."""
        maps = [proj(f) for proj, f in zip(self.lateral, feature_maps)]
        source = feature_maps[-1]
        for conv in self.extra:
            source = conv(source)
            maps.append(source)
        masks = [F.interpolate(pixel_mask[:, None].float(), size=m.shape[-2:])[:, 0].bool() for m in maps]
        positions = [self.position(m.shape, m.device, m.dtype, mask) for m, mask in zip(maps, masks)]
        return maps, masks, positions


class ContrastiveClassHead(nn.Module):
    """Class logits as scaled dot products between query features and class ("text") features, plus a bias.

    The bias starts at the focal-loss prior (p = 0.01). Logits are finite everywhere; callers mask padded classes.
    """

    def __init__(self, d_model: int, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.scale = d_model**-0.5
        # 1-d, not a scalar: DeepSpeed cannot broadcast 0-d parameters
        self.bias = nn.Parameter(torch.full((1,), -math.log((1 - prior_prob) / prior_prob)))

    def forward(self, hidden: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
        """``hidden`` [B, Q, d], ``class_features`` [B, G, d] -> logits [B, Q, G]."""
        return torch.einsum("bqd,bgd->bqg", hidden, class_features) * self.scale + self.bias


class PoseDecoderLayer(nn.Module):
    """One decoder layer over instance groups of tokens ``[B, P, T, d]`` (token 0 = box query, 1.. = keypoints).

    Order: self-attention among the box queries of all instances; self-attention inside each instance (box +
    keypoint tokens, only in pose layers); multi-scale deformable cross-attention of every token around its
    reference box; feed-forward. Post-norm residual blocks, as in Deformable DETR.

    Args:
        config: Deformable DETR config sizing the attention modules.
        intra_instance: build the within-instance attention (pose stage).
    """

    def __init__(self, config: DeformableDetrConfig, intra_instance: bool) -> None:
        super().__init__()
        d, heads = config.d_model, config.decoder_attention_heads
        self.inter_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.inter_norm = nn.LayerNorm(d)
        self.intra_attn = nn.MultiheadAttention(d, heads, batch_first=True) if intra_instance else None
        self.intra_norm = nn.LayerNorm(d) if intra_instance else None
        self.cross_attn = DeformableDetrMultiscaleDeformableAttention(config, heads, config.decoder_n_points)
        self.cross_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, config.decoder_ffn_dim), nn.ReLU(), nn.Linear(config.decoder_ffn_dim, d))
        self.ffn_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)
        init_deformable_attention(self.cross_attn)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        token_mask: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        spatial_shapes: torch.Tensor,
        spatial_shapes_list: list[tuple[int, int]],
        level_start_index: torch.Tensor,
    ) -> torch.Tensor:
        """Args:
            tokens, positions: [B, P, T, d] query contents and position embeddings.
            token_mask: [B, P, T] bool, False on padded keypoint tokens.
            reference_boxes: [B, P*T, L, 4] reference boxes per level (already scaled by the valid ratios).
            memory: [B, S, d] encoder output; memory_mask [B, S] bool (True = real pixel).
            spatial_shapes, spatial_shapes_list, level_start_index: multi-scale layout of ``memory``.
        Returns:
            [B, P, T, d] updated tokens.
        """
        b, p, t, d = tokens.shape
        box, box_pos = tokens[:, :, 0], positions[:, :, 0]  # [B, P, d]
        attended = self.inter_attn(box + box_pos, box + box_pos, box)[0]  # [B, P, d]
        box = self.inter_norm(box + self.dropout(attended))
        tokens = torch.cat([box[:, :, None], tokens[:, :, 1:]], 2)  # [B, P, T, d]

        if self.intra_attn is not None and t > 1:
            x = tokens.reshape(b * p, t, d)  # [B*P, T, d]
            q = x + positions.reshape(b * p, t, d)  # [B*P, T, d]
            attended = self.intra_attn(q, q, x, key_padding_mask=~token_mask.reshape(b * p, t))[0]  # [B*P, T, d]
            tokens = self.intra_norm(x + self.dropout(attended)).view(b, p, t, d)

        flat, flat_pos = tokens.reshape(b, p * t, d), positions.reshape(b, p * t, d)  # [B, P*T, d]
        attended = self.cross_attn(
            hidden_states=flat,
            attention_mask=memory_mask,
            encoder_hidden_states=memory,
            position_embeddings=flat_pos,
            reference_points=reference_boxes,
            spatial_shapes=spatial_shapes,
            spatial_shapes_list=spatial_shapes_list,
            level_start_index=level_start_index,
        )[0]  # [B, P*T, d]
        flat = self.cross_norm(flat + self.dropout(attended))
        flat = self.ffn_norm(flat + self.dropout(self.ffn(flat)))
        return flat.view(b, p, t, d)
