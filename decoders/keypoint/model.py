"""The keypoint decoder behind ``[POSE]``: a UniPose-style two-stage deformable DETR driven by super-link queries.

One answer carries two kinds of super-link groups, told apart by their route token id:

- object-class groups (``[DET]``, one per object class, e.g. person, dog) go through ``projection_llava`` and are
  averaged over their K query states into class features for a contrastive class head;
- keypoint groups (``[POSE]``, one per keypoint name, in prompt order) go through ``projection_kpt_llava`` and are
  averaged over K into keypoint embeddings ``[B, Kp, d]``.

Which route ids mean which is data: the owning model calls :meth:`KeypointDecoder.set_route_ids` once (e.g. with the
tokenizer ids of ``[DET]`` and ``[POSE]``); ``forward``/``predict`` then split ``queries`` by ``route_ids``.

Design: backbone (transformers ``AutoBackbone``) -> 4-level neck -> deformable encoder -> two-stage proposals scored
against the class features -> ``num_queries`` instance queries (learned content, proposal boxes) refined by
``num_box_decoder_layers`` box layers -> the best ``num_pose_queries`` instances each expand into 1 box query plus Kp
keypoint queries whose content *is* the LLM keypoint embedding (initial positions: box centre + an offset predicted
from instance and keypoint embedding) -> pose layers (attention among instances, within each instance, deformable
cross-attention around each query's reference box) refine boxes, keypoints and visibility.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn
from transformers.models.deformable_detr.modeling_deformable_detr import (
    DeformableDetrEncoderLayer,
    DeformableDetrMLPPredictionHead,
    inverse_sigmoid,
)
from transformers.models.grounding_dino.modeling_grounding_dino import encode_sinusoidal_position_embedding

from superlink import Route
from superlink.projection import QueryProjection

from ..base import Decoder, DecoderOutput, register_decoder
from .config import KeypointDecoderConfig
from .criterion import LayerOutput, PoseCriterion
from .modules import (
    ContrastiveClassHead,
    MultiScaleNeck,
    PoseDecoderLayer,
    build_backbone,
    deformable_config,
    init_deformable_attention,
    load_backbone,
)
from .postprocess import postprocess
from .preprocess import prepare_images, prepare_targets

__all__ = ["KeypointQueries", "EncodedImages", "KeypointPredictions", "KeypointDecoder"]


@dataclass
class KeypointQueries:
    """Super-link groups of one batch split by kind, projected and averaged over their K query states.

    Attributes:
        class_features: [B, Go, d] object-class features, in answer order; class_mask [B, Go] bool.
        keypoint_features: [B, Kp, d] keypoint embeddings, in answer order; keypoint_mask [B, Kp] bool.
    """

    class_features: torch.Tensor
    class_mask: torch.Tensor
    keypoint_features: torch.Tensor
    keypoint_mask: torch.Tensor


@dataclass
class EncodedImages:
    """Flattened multi-scale encoder output.

    Attributes:
        memory: [B, S, d]; mask: [B, S] bool (True = real pixel); spatial_shapes: [L, 2] long (h, w);
        spatial_shapes_list: the same as Python tuples; level_start_index: [L]; valid_ratios: [B, L, 2] (w, h).
    """

    memory: torch.Tensor
    mask: torch.Tensor
    spatial_shapes: torch.Tensor
    spatial_shapes_list: list[tuple[int, int]]
    level_start_index: torch.Tensor
    valid_ratios: torch.Tensor


@dataclass
class KeypointPredictions:
    """Raw outputs: ``layers[0]`` are the encoder proposals, ``layers[-1]`` the final decoder layer."""

    layers: list[LayerOutput]
    groups: KeypointQueries


def _compact(values: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the kept groups of each sample to the front, preserving their order.

    Args:
        values: [B, G, ...]; keep: [B, G] bool.
    Returns:
        [B, n, ...] with n = most kept groups in a sample (zeros on padding) and its [B, n] mask.
    """
    counts = keep.sum(1)  # [B]
    n = int(counts.max()) if keep.numel() else 0
    slot = keep.long().cumsum(1) - 1  # [B, G]
    batch = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)  # [B, G]
    out = values.new_zeros(keep.shape[0], n, *values.shape[2:])  # [B, n, ...]
    out = out.index_put((batch[keep], slot[keep]), values[keep])
    mask = torch.arange(n, device=keep.device)[None] < counts[:, None]  # [B, n]
    return out, mask


def _cell_centers(shapes: list[tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
    """Normalised (x, y) centres of the cells of every level, flattened level by level: [S, 2]."""
    centers = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(
            (torch.arange(h, device=like.device, dtype=like.dtype) + 0.5) / h,
            (torch.arange(w, device=like.device, dtype=like.dtype) + 0.5) / w,
            indexing="ij",
        )
        centers.append(torch.stack([xs.flatten(), ys.flatten()], -1))  # [h*w, 2]
    return torch.cat(centers)


def _zero_last_layer(head: DeformableDetrMLPPredictionHead) -> DeformableDetrMLPPredictionHead:
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    return head


@register_decoder("keypoint")
class KeypointDecoder(Decoder):
    """Keypoint decoder for ``[POSE]`` (see the module docstring for the design).

    Args:
        config: :class:`KeypointDecoderConfig`.
        llm_hidden_size: width C of the super-link query states.
    """

    config_class: ClassVar[type] = KeypointDecoderConfig

    def __init__(self, config: KeypointDecoderConfig, llm_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.object_route_ids: tuple[int, ...] = ()
        self.keypoint_route_ids: tuple[int, ...] = ()
        d, levels = config.d_model, config.num_feature_levels
        self.projection_llava = QueryProjection(llm_hidden_size, config.projection_hidden_dim, d, 3)
        self.projection_kpt_llava = QueryProjection(llm_hidden_size, config.projection_hidden_dim, d, 3)

        self.backbone = build_backbone(config)
        self.neck = MultiScaleNeck(list(self.backbone.channels), d, levels)
        self.level_embed = nn.Parameter(torch.randn(levels, d))
        attn_config = deformable_config(config)
        self.encoder_layers = nn.ModuleList(
            DeformableDetrEncoderLayer(attn_config) for _ in range(config.num_encoder_layers)
        )
        for layer in self.encoder_layers:
            init_deformable_attention(layer.self_attn)

        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.enc_bbox_embed = _zero_last_layer(DeformableDetrMLPPredictionHead(d, d, 4, 3))
        self.tgt_embed = nn.Embedding(config.num_queries, d)
        self.ref_point_head = DeformableDetrMLPPredictionHead(2 * d, d, d, 2)
        self.class_head = ContrastiveClassHead(d)

        n_box, n_pose = config.num_box_decoder_layers, config.num_decoder_layers - config.num_box_decoder_layers
        self.decoder_layers = nn.ModuleList(
            PoseDecoderLayer(attn_config, intra_instance=i >= n_box) for i in range(config.num_decoder_layers)
        )
        self.bbox_embed = nn.ModuleList(
            _zero_last_layer(DeformableDetrMLPPredictionHead(d, d, 4, 3)) for _ in range(config.num_decoder_layers)
        )
        self.pose_init_embed = _zero_last_layer(DeformableDetrMLPPredictionHead(d, d, 2, 3))
        self.pose_embed = nn.ModuleList(
            _zero_last_layer(DeformableDetrMLPPredictionHead(d, d, 2, 3)) for _ in range(n_pose)
        )
        self.visibility_embed = nn.ModuleList(nn.Linear(d, 1) for _ in range(n_pose))
        self.criterion = PoseCriterion(config)

    def load_pretrained(self, path: str | None = None) -> None:
        """Load the backbone's weights from a local transformers folder (default ``config.backbone_pretrained``); the
        rest of the decoder keeps its initialisation."""
        path = path or self.config.backbone_pretrained
        if not path:
            raise ValueError("keypoint.backbone_pretrained: no backbone folder given")
        load_backbone(self.backbone, path)

    # ------------------------------------------------------------------------------------------------------------
    # inputs

    def bind_routes(self, own: dict[int, Route], absorbed: dict[int, Route]) -> None:
        """Own routes mark keypoint groups; absorbed routes mark object-class groups."""
        super().bind_routes(own, absorbed)
        self.set_route_ids(object_ids=list(absorbed), keypoint_ids=list(own))

    def set_route_ids(self, object_ids: Sequence[int], keypoint_ids: Sequence[int]) -> None:
        """Declare which route token ids mark object-class groups (``[DET]``) and keypoint groups (``[POSE]``)."""
        self.object_route_ids = tuple(int(i) for i in object_ids)
        self.keypoint_route_ids = tuple(int(i) for i in keypoint_ids)
        if set(self.object_route_ids) & set(self.keypoint_route_ids):
            raise ValueError("object_ids and keypoint_ids must not share a route id")

    def prepare(self, images: list[Image.Image], targets: list[dict] | None = None) -> dict[str, Any]:
        """Resize (short side ``image_size``, long side <= ``max_image_size``), normalise and pad the images;
        normalise and pad the targets. Returns ``pixel_values``, ``pixel_mask``, ``orig_sizes``, ``image_sizes`` and
        ``targets`` (None without targets)."""
        cfg = self.config
        inputs: dict[str, Any] = prepare_images(images, cfg.image_size, cfg.max_image_size, cfg.size_divisor)
        inputs["targets"] = None
        if targets is not None:
            inputs["targets"] = prepare_targets(targets, inputs["orig_sizes"], cfg.oks_sigmas, cfg.uniform_oks_sigma)
        return inputs

    def split_groups(
        self, queries: torch.Tensor, query_mask: torch.Tensor, route_ids: torch.Tensor | None
    ) -> KeypointQueries:
        """Split ``queries`` [B, G, K, C] into object-class and keypoint groups by ``route_ids`` [B, G]."""
        if route_ids is None:
            raise ValueError("the keypoint decoder needs route_ids to tell [DET] groups from [POSE] groups")
        if not self.object_route_ids or not self.keypoint_route_ids:
            raise RuntimeError("call KeypointDecoder.set_route_ids(object_ids, keypoint_ids) before use")
        query_mask, route_ids = query_mask.to(queries.device).bool(), route_ids.to(queries.device)
        is_object = torch.isin(route_ids, torch.tensor(self.object_route_ids, device=route_ids.device)) & query_mask
        is_keypoint = torch.isin(route_ids, torch.tensor(self.keypoint_route_ids, device=route_ids.device))
        is_keypoint = is_keypoint & query_mask
        if (query_mask & ~is_object & ~is_keypoint).any():
            unknown = sorted(set(route_ids[query_mask & ~is_object & ~is_keypoint].tolist()))
            raise ValueError(
                f"route_ids {unknown} are neither object_route_ids {self.object_route_ids} nor keypoint_route_ids "
                f"{self.keypoint_route_ids}"
            )
        dtype = self.projection_llava.layers[0].weight.dtype
        objects, class_mask = _compact(queries.to(dtype), is_object)  # [B, Go, K, C], [B, Go]
        keypoints, keypoint_mask = _compact(queries.to(dtype), is_keypoint)  # [B, Kp, K, C], [B, Kp]
        if objects.shape[1] > self.config.max_object_groups:
            raise ValueError(f"a sample has {objects.shape[1]} object groups; max_object_groups is "
                             f"{self.config.max_object_groups}")
        if keypoints.shape[1] > self.config.max_keypoints:
            raise ValueError(f"a sample has {keypoints.shape[1]} keypoint groups; max_keypoints is "
                             f"{self.config.max_keypoints}")
        return KeypointQueries(
            class_features=self.projection_llava(objects).mean(2),  # [B, Go, d]
            class_mask=class_mask,
            keypoint_features=self.projection_kpt_llava(keypoints).mean(2),  # [B, Kp, d]
            keypoint_mask=keypoint_mask,
        )

    # ------------------------------------------------------------------------------------------------------------
    # image encoder

    def encode(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> EncodedImages:
        """Backbone, neck and deformable encoder: [B, 3, H, W] images -> flattened multi-scale memory."""
        feature_maps = self.backbone(pixel_values).feature_maps
        maps, masks, positions = self.neck(list(feature_maps), pixel_mask)
        shapes_list = [tuple(m.shape[-2:]) for m in maps]
        spatial_shapes = torch.tensor(shapes_list, dtype=torch.long, device=pixel_values.device)  # [L, 2]
        level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])  # [L]
        memory = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)  # [B, S, d]
        mask = torch.cat([m.flatten(1) for m in masks], 1)  # [B, S]
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[i] for i, p in enumerate(positions)], 1
        )  # [B, S, d]
        valid_ratios = torch.stack(
            [torch.stack([m[:, 0].sum(1) / m.shape[2], m[:, :, 0].sum(1) / m.shape[1]], -1) for m in masks], 1
        ).to(memory.dtype)  # [B, L, 2] (w, h)

        # encoder reference points: cell centres relative to the valid region, re-scaled to every level
        centers = _cell_centers(shapes_list, memory)  # [S, 2]
        ref = centers[None] / valid_ratios.repeat_interleave(spatial_shapes.prod(1), dim=1)  # [B, S, 2]
        ref = ref[:, :, None] * valid_ratios[:, None]  # [B, S, L, 2]
        for layer in self.encoder_layers:
            memory = layer(
                memory,
                attention_mask=mask,
                spatial_position_embeddings=pos,
                reference_points=ref,
                spatial_shapes=spatial_shapes,
                spatial_shapes_list=shapes_list,
                level_start_index=level_start_index,
            )
        return EncodedImages(memory, mask, spatial_shapes, shapes_list, level_start_index, valid_ratios)

    # ------------------------------------------------------------------------------------------------------------
    # decoder

    def _proposals(self, enc: EncodedImages, groups: KeypointQueries) -> tuple[LayerOutput, torch.Tensor]:
        """Two-stage proposals: every memory cell predicts a box (level-sized anchor + delta) and class logits.

        Returns:
            the proposal output over all cells and the [B, S] selection scores (-inf on invalid cells).
        """
        ratios = enc.valid_ratios.repeat_interleave(enc.spatial_shapes.prod(1), dim=1)  # [B, S, 2]
        sizes = torch.cat([
            ratios.new_full((h * w,), 0.05 * 2.0**level) for level, (h, w) in enumerate(enc.spatial_shapes_list)
        ])  # [S]
        centers = _cell_centers(enc.spatial_shapes_list, ratios)[None] / ratios  # [B, S, 2], in the valid region
        anchors = torch.cat([centers, sizes[None, :, None].expand(*centers.shape[:2], 2)], -1)  # [B, S, 4]
        valid = enc.mask & ((anchors > 0.01) & (anchors < 0.99)).all(-1)  # [B, S]
        hidden = self.enc_output_norm(self.enc_output(enc.memory * valid[..., None]))  # [B, S, d]
        boxes = (self.enc_bbox_embed(hidden) + inverse_sigmoid(anchors.clamp(0.01, 0.99))).sigmoid()  # [B, S, 4]
        logits = self.class_head(hidden, groups.class_features)  # [B, S, Go]
        return LayerOutput(logits, boxes), self._scores(logits, groups.class_mask).masked_fill(~valid, -torch.inf)

    @staticmethod
    def _scores(logits: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
        """Best real-class logit per query [B, Q] (a very low finite value when a sample has no class)."""
        low = torch.finfo(logits.dtype).min
        if logits.shape[-1] == 0:
            return logits.new_full(logits.shape[:2], low)
        return logits.masked_fill(~class_mask[:, None], low).amax(-1)

    def _positions(self, boxes: torch.Tensor, enc: EncodedImages) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference boxes [B, Q, 4] -> per-level references [B, Q, L, 4] and query positions [B, Q, d]."""
        ref = boxes[:, :, None] * enc.valid_ratios.repeat(1, 1, 2)[:, None]  # [B, Q, L, 4]
        sine = encode_sinusoidal_position_embedding(ref[:, :, 0], num_pos_feats=self.config.d_model // 2)
        return ref, self.ref_point_head(sine)  # [B, Q, 2d] -> [B, Q, d]

    def _run_layer(
        self, index: int, tokens: torch.Tensor, token_mask: torch.Tensor, boxes: torch.Tensor, enc: EncodedImages
    ) -> torch.Tensor:
        """Run decoder layer ``index`` on tokens [B, P, T, d] with reference boxes [B, P, T, 4]."""
        b, p, t, d = tokens.shape
        ref, pos = self._positions(boxes.detach().reshape(b, p * t, 4), enc)
        return self.decoder_layers[index](
            tokens, pos.view(b, p, t, d), token_mask, ref, enc.memory, enc.mask, enc.spatial_shapes,
            enc.spatial_shapes_list, enc.level_start_index,
        )

    def decode(self, enc: EncodedImages, groups: KeypointQueries) -> list[LayerOutput]:
        """Proposals, box stage and pose stage; returns the proposal output followed by every decoder layer's."""
        cfg = self.config
        proposals, scores = self._proposals(enc, groups)
        num_queries = min(cfg.num_queries, scores.shape[1])
        top = scores.topk(num_queries, dim=1).indices  # [B, N]
        outputs = [LayerOutput(
            proposals.logits.gather(1, top[..., None].expand(-1, -1, proposals.logits.shape[-1])),
            proposals.boxes.gather(1, top[..., None].expand(-1, -1, 4)),
        )]
        boxes = outputs[0].boxes.detach()  # [B, N, 4]
        hidden = self.tgt_embed.weight[None, :num_queries].expand(boxes.shape[0], -1, -1)  # [B, N, d]
        token_mask = torch.ones(*boxes.shape[:2], 1, dtype=torch.bool, device=boxes.device)  # [B, N, 1]
        for i in range(cfg.num_box_decoder_layers):
            hidden = self._run_layer(i, hidden[:, :, None], token_mask, boxes[:, :, None], enc)[:, :, 0]
            boxes = (self.bbox_embed[i](hidden) + inverse_sigmoid(boxes)).sigmoid()  # [B, N, 4]
            outputs.append(LayerOutput(self.class_head(hidden, groups.class_features), boxes))
            boxes = boxes.detach()
        return outputs + self._pose_stage(hidden, boxes, outputs[-1].logits, enc, groups)

    def _pose_stage(
        self, hidden: torch.Tensor, boxes: torch.Tensor, logits: torch.Tensor, enc: EncodedImages,
        groups: KeypointQueries,
    ) -> list[LayerOutput]:
        """Keep the best ``num_pose_queries`` instances, expand each into 1 box + Kp keypoint queries, refine."""
        cfg = self.config
        num_pose = min(cfg.num_pose_queries, hidden.shape[1])
        keep = self._scores(logits, groups.class_mask).topk(num_pose, dim=1).indices  # [B, P]
        hidden = hidden.gather(1, keep[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, P, d]
        boxes = boxes.gather(1, keep[..., None].expand(-1, -1, 4))  # [B, P, 4]
        b, p, d = hidden.shape
        kp = groups.keypoint_features.shape[1]
        kpt_content = groups.keypoint_features[:, None].expand(b, p, kp, d)  # [B, P, Kp, d]
        tokens = torch.cat([hidden[:, :, None], kpt_content], 2)  # [B, P, 1+Kp, d]
        token_mask = torch.cat(
            [groups.keypoint_mask.new_ones(b, p, 1), groups.keypoint_mask[:, None].expand(b, p, kp)], 2
        )  # [B, P, 1+Kp]
        offsets = self.pose_init_embed(hidden[:, :, None] + kpt_content)  # [B, P, Kp, 2]
        keypoints = (boxes[:, :, None, :2] + offsets * boxes[:, :, None, 2:]).clamp(0, 1)  # [B, P, Kp, 2]

        outputs = []
        for j, i in enumerate(range(cfg.num_box_decoder_layers, cfg.num_decoder_layers)):
            size = boxes[:, :, None, 2:] * cfg.keypoint_ref_size  # [B, P, 1, 2]
            kpt_boxes = torch.cat([keypoints, size.expand(-1, -1, kp, -1)], -1)  # [B, P, Kp, 4]
            refs = torch.cat([boxes[:, :, None], kpt_boxes], 2)  # [B, P, 1+Kp, 4]
            tokens = self._run_layer(i, tokens, token_mask, refs, enc)
            box_hidden, kpt_hidden = tokens[:, :, 0], tokens[:, :, 1:]  # [B, P, d], [B, P, Kp, d]
            boxes = (self.bbox_embed[i](box_hidden) + inverse_sigmoid(boxes)).sigmoid()  # [B, P, 4]
            keypoints = (self.pose_embed[j](kpt_hidden) + inverse_sigmoid(keypoints)).sigmoid()  # [B, P, Kp, 2]
            outputs.append(LayerOutput(
                self.class_head(box_hidden, groups.class_features),
                boxes,
                keypoints,
                self.visibility_embed[j](kpt_hidden)[..., 0],  # [B, P, Kp]
            ))
            boxes, keypoints = boxes.detach(), keypoints.detach()
        return outputs

    # ------------------------------------------------------------------------------------------------------------
    # entry points

    def _predictions(
        self, queries: torch.Tensor, query_mask: torch.Tensor, inputs: dict[str, Any], route_ids: torch.Tensor | None
    ) -> KeypointPredictions:
        device = self.level_embed.device
        groups = self.split_groups(queries, query_mask, route_ids)
        pixel_values = inputs["pixel_values"].to(device, self.level_embed.dtype)
        enc = self.encode(pixel_values, inputs["pixel_mask"].to(device))
        return KeypointPredictions(self.decode(enc, groups), groups)

    def _check_targets(self, targets: dict[str, torch.Tensor], groups: KeypointQueries) -> None:
        num_keypoints = groups.keypoint_mask.sum(1).cpu()  # [B]
        num_classes = groups.class_mask.sum(1).cpu()  # [B]
        for i, (kp, expected) in enumerate(zip(targets["num_keypoints"].tolist(), num_keypoints.tolist())):
            if kp != expected:
                raise ValueError(f"targets[{i}]['keypoints'] has {kp} keypoints but the answer has {expected} "
                                 "[POSE] groups")
        labels, present = targets["labels"].cpu(), targets["instance_mask"].cpu()
        if (present & (labels >= num_classes[:, None])).any():
            i = int((present & (labels >= num_classes[:, None])).any(1).nonzero()[0])
            raise ValueError(f"targets[{i}]['labels'] holds a label >= its {int(num_classes[i])} [DET] groups")

    def forward(
        self,
        queries: torch.Tensor,
        query_mask: torch.Tensor,
        inputs: dict[str, Any],
        route_ids: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """Training forward.

        Args:
            queries: [B, G, K, C] super-link query states; query_mask: [B, G] bool; route_ids: [B, G] route ids.
            inputs: from :meth:`prepare` (with ``targets`` for a loss).
        Returns:
            :class:`DecoderOutput` with the summed loss (None without targets), the per-term losses and the raw
            :class:`KeypointPredictions`.
        """
        preds = self._predictions(queries, query_mask, inputs, route_ids)
        if inputs.get("targets") is None:
            return DecoderOutput(loss=None, preds=preds)
        device = self.level_embed.device
        targets = {k: v.to(device) for k, v in inputs["targets"].items()}
        self._check_targets(targets, preds.groups)
        kp = preds.groups.keypoint_mask.shape[1]
        targets["keypoints"], targets["sigmas"] = targets["keypoints"][:, :, :kp], targets["sigmas"][:, :kp]
        loss, loss_dict = self.criterion(
            preds.layers, targets, preds.groups.class_mask, preds.groups.keypoint_mask,
            inputs["orig_sizes"].to(device),
        )
        return DecoderOutput(loss=loss, loss_dict=loss_dict, preds=preds)

    @torch.no_grad()
    def predict(
        self,
        queries: torch.Tensor,
        query_mask: torch.Tensor,
        inputs: dict[str, Any],
        route_ids: torch.Tensor | None = None,
        top_k: int = 100,
        score_threshold: float = 0.0,
        **options: Any,
    ) -> list[dict[str, torch.Tensor]]:
        """Per-image results in original pixels: ``boxes`` [n, 4] xyxy, ``scores`` [n], ``labels`` [n] (object-group
        index), ``keypoints`` [n, Kp, 3] (x, y, visibility score) in [POSE] group order. See :func:`postprocess`."""
        if options:
            raise TypeError(f"unknown predict options for the keypoint decoder: {sorted(options)}")
        preds = self._predictions(queries, query_mask, inputs, route_ids)
        return postprocess(
            preds.layers[-1], preds.groups.class_mask, preds.groups.keypoint_mask,
            inputs["orig_sizes"].to(self.level_embed.device), top_k, score_threshold,
        )
