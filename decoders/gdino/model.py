"""GroundingDINO decoder behind ``[DET]``, ``[SEG]`` and ``[GRD]`` (detection, instance/semantic segmentation,
grounding, referring segmentation and region-prompted segmentation).

Built on transformers' ``GroundingDinoForObjectDetection``. Its BERT text branch is replaced by the super-link
category queries: each group's K query states ``[B, G, K, C_llm]`` go through ``patch2query`` (an MLP to d_model) and
are mean-pooled over K, giving one "text" feature per category ``[B, G, d]`` (see :mod:`.text` for the text layout).
Class logits are the contrastive scores of the decoder queries against the encoder-enhanced category features;
category order is group order. A Mask-DINO style mask head (:mod:`.masks`) adds instance masks.

Parameter layout (the official checkpoint's, relative to its ``gdino.`` prefix): ``model.*`` is the transformers
``GroundingDinoModel`` (``model.backbone.conv_encoder.model.*``, ``model.input_proj_vision.*``, ``model.encoder.*``,
``model.decoder.*`` with ``model.decoder.bbox_embed.*``, ``model.level_embed``, ``model.query_position_embeddings``,
``model.enc_output*``, ``model.encoder_output_bbox_embed.*``), ``bbox_embed.{l}`` and ``mask_embed.{l}`` (shared
across layers), ``patch2query.layers.{0-2}``. The mask pixel decoder sits under ``pixel_decoder.*`` where the
official keeps it under ``model.*``; the official key rows in :mod:`.convert` (composed by ``vllm2.convert``) map it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, ResNetConfig, SwinConfig
from transformers.models.grounding_dino.modeling_grounding_dino import (
    GroundingDinoConvEncoder,
    GroundingDinoMLPPredictionHead,
)

from superlink import Route
from superlink.projection import QueryProjection

from ..base import Decoder, DecoderOutput, register_decoder
from .config import GroundingDinoDecoderConfig
from .criterion import SetCriterion
from .masks import PixelDecoder
from .postprocess import (
    MODES,
    SEMANTIC,
    boxes_to_original,
    masks_to_original,
    masks_to_rle,
    select_detections,
    semantic_to_original,
)
from .preprocess import ImagePreparer
from .text import CategoryText, CategoryTextBackbone, layout_categories

TASK_MODES = {"rec": "grounding", "res": "grounding", "semantic_seg": "semantic"}  # route task -> predict mode

__all__ = ["GroundingDinoDecoder", "GroundingOutput", "build_hf_config"]

logger = logging.getLogger(__name__)

IGNORED_PREFIXES = (  # the text branch, and the Swin final norm the backbone never reads
    "model.text_backbone.",
    "model.text_projection.",
    "model.backbone.conv_encoder.model.swin.layernorm.",
)
OWN_PREFIXES = (
    "patch2query.",
    "mask_embed.",
    "pixel_decoder.",
    "model.backbone.conv_encoder.model.hidden_states_norms.stage1.",
)


def _backbone_config(config: GroundingDinoDecoderConfig, out_indices: list[int]) -> SwinConfig | ResNetConfig:
    """The transformers backbone config (Swin or basic ResNet) with the given output stages."""
    if config.backbone_type == "swin":
        return SwinConfig(
            embed_dim=config.backbone_embed_dim,
            depths=list(config.backbone_depths),
            num_heads=list(config.backbone_num_heads),
            window_size=config.backbone_window_size,
            out_indices=out_indices,
        )
    return ResNetConfig(
        embedding_size=config.backbone_embed_dim,
        hidden_sizes=[config.backbone_embed_dim * 2**i for i in range(len(config.backbone_depths))],
        depths=list(config.backbone_depths),
        layer_type="basic",
        out_indices=out_indices,
    )


def build_hf_config(config: GroundingDinoDecoderConfig) -> GroundingDinoConfig:
    """The transformers ``GroundingDinoConfig`` of this decoder (backbone stages 2-4; a minimal text config, since
    the text branch is replaced)."""
    text_config = BertConfig(
        vocab_size=2, hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=32
    )
    return GroundingDinoConfig(
        backbone_config=_backbone_config(config, [2, 3, 4]),
        text_config=text_config,
        d_model=config.d_model,
        encoder_layers=config.num_encoder_layers,
        decoder_layers=config.num_decoder_layers,
        encoder_ffn_dim=config.ffn_dim,
        decoder_ffn_dim=config.ffn_dim,
        encoder_attention_heads=config.num_heads,
        decoder_attention_heads=config.num_heads,
        encoder_n_points=config.num_points,
        decoder_n_points=config.num_points,
        num_feature_levels=config.num_feature_levels,
        num_queries=config.num_queries,
        max_text_len=config.max_text_len,
        dropout=config.dropout,
        fusion_droppath=config.fusion_droppath,
        two_stage=True,
        embedding_init_target=True,
        auxiliary_loss=config.aux_loss,
        focal_alpha=config.focal_alpha,
    )


class FinestStageConvEncoder(GroundingDinoConvEncoder):
    """GroundingDINO's convolutional encoder whose backbone also outputs its finest stage (stride 4).

    ``forward`` returns the detection levels (stages 2-4) exactly like the stock encoder; the finest map and the
    spatial size of the first detection level are kept for the mask head until :meth:`take_finest`.
    """

    def __init__(self, config: GroundingDinoConfig) -> None:
        super().__init__(config)
        if hasattr(self.model, "swin"):
            # The backbone normalises each stage itself and never reads SwinModel's final norm: dropping it leaves no
            # parameter without a gradient and matches the official checkpoint's keys.
            self.model.swin.layernorm = nn.Identity()
        self.intermediate_channel_sizes = self.model.channels[1:]
        self._finest: tuple[torch.Tensor, tuple[int, int]] | None = None

    @property
    def finest_channels(self) -> int:
        return self.model.channels[0]

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        levels = super().forward(pixel_values, pixel_mask)
        self._finest = (levels[0][0], tuple(levels[1][0].shape[-2:]))
        return levels[1:]

    def take_finest(self) -> tuple[torch.Tensor, tuple[int, int]]:
        """The finest stage ``[B, C1, H/4, W/4]`` of the last call and the (h, w) of the first detection level."""
        if self._finest is None:
            raise RuntimeError("the backbone has not run since the finest stage was last taken")
        finest, self._finest = self._finest, None
        return finest


@dataclass
class GroundingOutput:
    """Raw outputs of one pass over a chunk of categories.

    Attributes:
        logits: ``[B, L, Q, G]`` class logits per decoder layer (``-inf`` on padding groups).
        boxes: ``[B, L, Q, 4]`` normalised cxcywh boxes per decoder layer.
        mask_embeds: ``[B, L, Q, d]`` mask embeddings per decoder layer.
        mask_features: ``[B, d, H/4, W/4]`` mask features over the padded canvas.
        enc_logits: ``[B, Q, G]`` class logits of the top encoder proposals.
        enc_boxes: ``[B, Q, 4]`` boxes of the top encoder proposals.
        group_mask: ``[B, G]`` real groups.
    """

    logits: torch.Tensor
    boxes: torch.Tensor
    mask_embeds: torch.Tensor
    mask_features: torch.Tensor
    enc_logits: torch.Tensor
    enc_boxes: torch.Tensor
    group_mask: torch.Tensor


@register_decoder("gdino")
class GroundingDinoDecoder(Decoder):
    """GroundingDINO over super-link category queries.

    Args:
        config: decoder settings (defaults: the official 7B dimensions).
        llm_hidden_size: width C of the LLM query states.
    """

    config_class = GroundingDinoDecoderConfig
    tied_weights_keys = {  # aliases of the shared box and mask heads: saved once
        r"bbox_embed.(?![0])\d+": "bbox_embed.0",
        "model.decoder.bbox_embed": "bbox_embed",
        r"mask_embed.(?![0])\d+": "mask_embed.0",
    }

    def __init__(self, config: GroundingDinoDecoderConfig, llm_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.llm_hidden_size = llm_hidden_size
        hf_config = build_hf_config(config)
        detector = GroundingDinoForObjectDetection(hf_config)
        model = detector.model
        model.text_backbone = CategoryTextBackbone()
        model.text_projection = nn.Identity()
        tapped_config = copy.deepcopy(hf_config)
        tapped_config.backbone_config = _backbone_config(config, [1, 2, 3, 4])
        model.backbone.conv_encoder = FinestStageConvEncoder(tapped_config)
        self.model = model
        # one box head serves every decoder layer (shared modules, so loading any of its names fills them all)
        self.bbox_embed = nn.ModuleList([detector.bbox_embed[0]] * config.num_decoder_layers)
        model.decoder.bbox_embed = self.bbox_embed
        mask_embed = GroundingDinoMLPPredictionHead(config.d_model, config.d_model, config.d_model, 3)
        self.mask_embed = nn.ModuleList([mask_embed] * config.num_decoder_layers)
        self.pixel_decoder = PixelDecoder(model.backbone.conv_encoder.finest_channels, config.d_model)
        self.patch2query = QueryProjection(
            llm_hidden_size, config.projection_hidden_dim, config.d_model, config.projection_layers
        )
        self.criterion = SetCriterion(config)
        self.preparer = ImagePreparer(config)
        self.route_modes: dict[int, str] = {}
        if config.freeze_backbone:
            self.model.freeze_backbone()
        else:
            self.model.unfreeze_backbone()

    # ----------------------------------------------------------------------------------------------- inputs

    def prepare(self, images: list[Any], targets: list[dict] | None = None) -> dict[str, Any]:
        """Resize, normalise and pad images; convert targets (see :class:`.preprocess.ImagePreparer`)."""
        return self.preparer(images, targets)

    def bind_routes(self, own: dict[int, Route], absorbed: dict[int, Route]) -> None:
        """Read each own route's inference mode from the tasks it serves (REC/RES: grounding; semantic seg:
        semantic; everything else: det)."""
        super().bind_routes(own, absorbed)
        modes = {i: mode for i, r in own.items() for task, mode in TASK_MODES.items() if task in r.tasks}
        self.set_route_modes(modes)

    def set_route_modes(self, route_modes: Mapping[int, str]) -> None:
        """Declare how groups of each route id are read at inference (``"det"``, ``"grounding"``, ``"semantic"``);
        unlisted routes read as ``"det"``."""
        self.route_modes = self._check_modes(dict(route_modes), "route_modes")

    def embed_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """Project query states ``[B, G, K, C]`` to one category feature per group ``[B, G, d]`` (mean over K)."""
        weight = self.patch2query.layers[0].weight
        return self.patch2query(queries.to(weight.dtype)).mean(2)  # [B, G, d]

    # ----------------------------------------------------------------------------------------------- model pass

    def _chunks(self, num_groups: int) -> list[tuple[int, int]]:
        """Group ranges scored in one pass each."""
        step = self.config.max_categories
        return [(start, min(start + step, num_groups)) for start in range(0, num_groups, step)]

    def _run(
        self, features: torch.Tensor, group_mask: torch.Tensor, pixel_values: torch.Tensor, pixel_mask: torch.Tensor
    ) -> GroundingOutput:
        """One GroundingDINO pass over categories ``features`` ``[B, G, d]`` (``group_mask`` ``[B, G]``)."""
        text = layout_categories(features, group_mask)
        with self.model.text_backbone.provide(text.features):
            out = self.model(
                pixel_values=pixel_values,
                input_ids=text.input_ids,
                attention_mask=text.attention_mask,
                pixel_mask=pixel_mask,
                return_dict=True,
            )
        finest, (height, width) = self.model.backbone.conv_encoder.take_finest()
        categories = out.encoder_last_hidden_state_text.gather(
            1, text.slots[..., None].expand(-1, -1, features.shape[-1])
        )  # [B, G, d]
        hidden = out.intermediate_hidden_states  # [B, L, Q, d]
        logits = torch.einsum("blqd,bgd->blqg", hidden, categories)  # [B, L, Q, G]
        logits = logits.masked_fill(~text.group_mask[:, None, None, :], float("-inf"))
        references = torch.cat(
            [out.init_reference_points[:, None], out.intermediate_reference_points[:, :-1]], dim=1
        )  # [B, L, Q, 4]
        boxes = torch.stack(
            [
                (head(hidden[:, level]) + torch.special.logit(references[:, level], eps=1e-5)).sigmoid()
                for level, head in enumerate(self.bbox_embed)
            ],
            dim=1,
        )  # [B, L, Q, 4]
        mask_embeds = torch.stack([head(hidden[:, level]) for level, head in enumerate(self.mask_embed)], dim=1)
        memory = out.encoder_last_hidden_state_vision[:, : height * width]  # [B, h*w, d]
        memory = memory.transpose(1, 2).reshape(memory.shape[0], -1, height, width)  # [B, d, H/8, W/8]
        enc_logits, enc_boxes = self._top_proposals(out.enc_outputs_class, out.enc_outputs_coord_logits, text)
        return GroundingOutput(
            logits=logits,
            boxes=boxes,
            mask_embeds=mask_embeds,
            mask_features=self.pixel_decoder(finest, memory),
            enc_logits=enc_logits,
            enc_boxes=enc_boxes,
            group_mask=text.group_mask,
        )

    def _top_proposals(
        self, class_logits: torch.Tensor, coord_logits: torch.Tensor, text: CategoryText
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits ``[B, Q, G]`` and boxes ``[B, Q, 4]`` of the ``num_queries`` best encoder proposals."""
        per_group = text.gather(class_logits)  # [B, S, G]
        top = per_group.max(-1).values.topk(self.config.num_queries, dim=1).indices  # [B, Q]
        logits = per_group.gather(1, top[..., None].expand(-1, -1, per_group.shape[-1]))  # [B, Q, G]
        boxes = coord_logits.gather(1, top[..., None].expand(-1, -1, 4)).sigmoid()  # [B, Q, 4]
        return logits, boxes

    # ----------------------------------------------------------------------------------------------- training

    def forward(
        self,
        queries: torch.Tensor,
        query_mask: torch.Tensor,
        inputs: dict[str, Any],
        route_ids: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """Run the decoder and, when ``inputs["targets"]`` is set, the set loss.

        Args:
            queries: ``[B, G, K, C]`` query states (one group per category, in answer order).
            query_mask: ``[B, G]`` real groups.
            inputs: from :meth:`prepare`.
            route_ids: ``[B, G]``; training treats every route alike.

        Returns:
            The loss (mean over category chunks), its weighted terms and ``preds`` (final-layer ``logits``
            ``[B, Q', G]`` and ``boxes`` ``[B, Q', 4]``, Q' = queries x chunks).
        """
        pixel_values, pixel_mask, query_mask = self._check_inputs(queries, query_mask, inputs)
        features = self.embed_queries(queries)  # [B, G, d]
        targets = inputs.get("targets")
        if targets is not None:
            targets = self._check_targets(targets, query_mask, pixel_values.device)
        outputs, loss_dict = [], {}
        chunks = self._chunks(queries.shape[1])
        for start, end in chunks:
            out = self._run(features[:, start:end], query_mask[:, start:end], pixel_values, pixel_mask)
            outputs.append(out)
            if targets is not None:
                terms = self.criterion(self._criterion_outputs(out), _chunk_targets(targets, start, end))
                for key, value in terms.items():
                    loss_dict[key] = loss_dict.get(key, 0.0) + value / len(chunks)
        loss = torch.stack(list(loss_dict.values())).sum() if loss_dict else None
        logits, boxes, _, _ = _merge_chunks(outputs, chunks, queries.shape[1])
        return DecoderOutput(loss=loss, loss_dict=loss_dict, preds={"logits": logits, "boxes": boxes})

    def _criterion_outputs(self, out: GroundingOutput) -> dict[str, Any]:
        """The per-stage dicts :class:`.criterion.SetCriterion` reads."""
        batch, num_layers, num_queries, num_groups = out.logits.shape
        label_maps = (torch.eye(num_groups, device=out.logits.device),) * batch
        text_mask = out.group_mask[:, None, :].expand(batch, num_queries, num_groups)  # [B, Q, G]
        common = {"label_maps": label_maps, "text_mask": text_mask}
        layers = [
            {
                "logits": out.logits[:, level],
                "pred_boxes": out.boxes[:, level],
                "mask_embeds": out.mask_embeds[:, level],
                "mask_features": out.mask_features,
                **common,
            }
            for level in range(num_layers)
        ]
        if not self.config.aux_loss:
            layers = layers[-1:]
        encoder = {"logits": out.enc_logits, "pred_boxes": out.enc_boxes, **common} if self.config.enc_loss else None
        return {"layers": layers, "encoder": encoder}

    # ----------------------------------------------------------------------------------------------- inference

    @torch.no_grad()
    def predict(
        self,
        queries: torch.Tensor,
        query_mask: torch.Tensor,
        inputs: dict[str, Any],
        route_ids: torch.Tensor | None = None,
        mode: str | list[str] | None = None,
        route_modes: Mapping[int, str] | None = None,
        topk: int | None = None,
        score_threshold: float | None = None,
        return_masks: bool | None = None,
        **options: Any,
    ) -> list[dict[str, Any]]:
        """Per-sample results in original image pixels.

        Args:
            queries, query_mask, inputs, route_ids: as in :meth:`forward`.
            mode: ``"det"``, ``"grounding"`` or ``"semantic"`` for every group, or one mode per sample; overrides the
                route modes.
            route_modes: route id -> mode (default: :meth:`set_route_modes`; unlisted routes read as ``"det"``).
            topk, score_threshold, return_masks: override the config's inference settings.

        Returns:
            Per sample: ``boxes`` ``[n, 4]`` xyxy, ``scores`` ``[n]``, ``labels`` ``[n]`` (group indices); with masks
            also ``masks`` ``[n, H, W]`` bool and ``rles`` (COCO RLE dicts); with semantic groups ``semantic``
            ``[H, W]`` long (group index of each pixel, -1 for background).
        """
        if options:
            raise TypeError(f"unknown predict options: {sorted(options)}")
        pixel_values, pixel_mask, query_mask = self._check_inputs(queries, query_mask, inputs)
        features = self.embed_queries(queries)  # [B, G, d]
        chunks = self._chunks(queries.shape[1])
        outputs = [self._run(features[:, s:e], query_mask[:, s:e], pixel_values, pixel_mask) for s, e in chunks]
        logits, boxes, mask_embeds, mask_features = _merge_chunks(outputs, chunks, queries.shape[1])
        modes = self._group_modes(query_mask, route_ids, mode, route_modes)  # [B, G]
        settings = {
            "topk": self.config.topk if topk is None else topk,
            "threshold": self.config.score_threshold if score_threshold is None else score_threshold,
            "masks": self.config.return_masks if return_masks is None else return_masks,
        }
        sizes = {
            "canvas": tuple(pixel_values.shape[-2:]),
            "image": inputs["image_sizes"].tolist(),
            "orig": inputs["orig_sizes"].tolist(),
        }
        return [
            self._sample_result(b, logits[b].sigmoid(), boxes[b], mask_embeds[b], mask_features[:, b], modes[b],
                                sizes, settings)
            for b in range(queries.shape[0])
        ]

    def _sample_result(
        self,
        index: int,
        probs: torch.Tensor,
        boxes: torch.Tensor,
        mask_embeds: torch.Tensor,
        mask_features: torch.Tensor,
        modes: torch.Tensor,
        sizes: dict[str, Any],
        settings: dict[str, Any],
    ) -> dict[str, Any]:
        """Post-process one sample (``probs`` ``[Q', G]``, ``boxes`` ``[Q', 4]``, ``mask_embeds`` ``[Q', d]``,
        ``mask_features`` ``[n_chunks, d, h, w]``); the result's tensors are on the CPU."""
        canvas, image_size, orig_size = sizes["canvas"], tuple(sizes["image"][index]), tuple(sizes["orig"][index])
        query_idx, labels, scores = select_detections(probs, modes, settings["topk"], settings["threshold"])
        result: dict[str, Any] = {
            "boxes": boxes_to_original(boxes[query_idx], orig_size),
            "scores": scores,
            "labels": labels,
        }
        if settings["masks"]:
            logits = _mask_logits(mask_embeds, mask_features, query_idx, self.config.num_queries)
            masks = masks_to_original(logits, canvas, image_size, orig_size, self.config.mask_threshold)
            result["masks"] = masks
            result["rles"] = masks_to_rle(masks)
        semantic_groups = (modes == SEMANTIC).nonzero().flatten()  # [Gs]
        if semantic_groups.numel():
            all_queries = torch.arange(probs.shape[0], device=probs.device)
            logits = _mask_logits(mask_embeds, mask_features, all_queries, self.config.num_queries)  # [Q', h, w]
            per_pixel = semantic_to_original(probs[:, semantic_groups], logits, canvas, image_size, orig_size,
                                             self.config.semantic_threshold)  # [H, W], -1: background
            result["semantic"] = torch.where(per_pixel >= 0, semantic_groups[per_pixel.clamp(min=0)], -1)
        return {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in result.items()}

    # ----------------------------------------------------------------------------------------------- weights

    def load_pretrained(self, path: str | None = None) -> dict[str, list[str]]:
        """Load transformers GroundingDINO weights (e.g. grounding-dino-tiny) from a local folder.

        The text branch (BERT and its projection) and the unused Swin final norm are ignored; ``patch2query``, the mask head and the stage-1 norm of
        the backbone keep their initialisation.

        Args:
            path: the folder (``config.json`` + weights); defaults to ``config.pretrained_path``.

        Returns:
            ``missing`` (parameters left as initialised) and ``ignored`` (checkpoint keys not used).
        """
        path = path if path is not None else self.config.pretrained_path
        if path is None:
            raise ValueError("no GroundingDINO weights folder given (argument path or gdino.pretrained_path)")
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"GroundingDINO weights folder not found or without config.json: {folder} "
                                    f"(gdino.pretrained_path)")
        pretrained = GroundingDinoForObjectDetection.from_pretrained(str(folder), local_files_only=True)
        self._check_compatible(pretrained.config, folder)
        state = pretrained.state_dict()
        ignored = [key for key in state if key.startswith(IGNORED_PREFIXES)]
        state = {key: value for key, value in state.items() if not key.startswith(IGNORED_PREFIXES)}
        missing, unexpected = self.load_state_dict(state, strict=False)
        unknown = [key for key in missing if not key.startswith(OWN_PREFIXES)]
        if unexpected or unknown:
            raise ValueError(f"checkpoint {folder} does not fit the gdino decoder: unexpected keys {unexpected[:5]}, "
                             f"missing keys {unknown[:5]}")
        logger.info("loaded GroundingDINO weights from %s (%d tensors; %d unused keys ignored)", folder,
                    len(state), len(ignored))
        return {"missing": list(missing), "ignored": ignored}

    def _check_compatible(self, pretrained: GroundingDinoConfig, folder: Path) -> None:
        """Raise a clear error when the checkpoint's dimensions differ from this decoder's."""
        ours = build_hf_config(self.config)
        fields = ("d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim", "num_queries", "num_feature_levels",
                  "encoder_n_points", "decoder_n_points")
        differ = [f"{name}: {getattr(pretrained, name)} != {getattr(ours, name)}" for name in fields
                  if getattr(pretrained, name) != getattr(ours, name)]
        backbone, expected = pretrained.backbone_config, ours.backbone_config
        if backbone.model_type != expected.model_type:
            differ.append(f"backbone: {backbone.model_type} != {expected.model_type}")
        elif getattr(backbone, "depths", None) != expected.depths:
            differ.append(f"backbone depths: {backbone.depths} != {expected.depths}")
        if differ:
            raise ValueError(f"checkpoint {folder} does not match the gdino config: " + "; ".join(differ))

    # ----------------------------------------------------------------------------------------------- checks

    def _check_inputs(
        self, queries: torch.Tensor, query_mask: torch.Tensor, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validate shapes; return ``pixel_values``, ``pixel_mask`` and ``query_mask`` on the decoder's device."""
        if queries.dim() != 4 or queries.shape[-1] != self.llm_hidden_size:
            raise ValueError(f"queries must be [B, G, K, {self.llm_hidden_size}], got {tuple(queries.shape)}")
        if query_mask.shape != queries.shape[:2]:
            raise ValueError(f"query_mask must be {tuple(queries.shape[:2])}, got {tuple(query_mask.shape)}")
        if queries.shape[1] == 0:
            raise ValueError("queries has no groups")
        for key in ("pixel_values", "pixel_mask", "image_sizes", "orig_sizes"):
            if key not in inputs:
                raise ValueError(f"inputs has no {key!r}; build inputs with prepare()")
        weight = self.patch2query.layers[0].weight
        pixel_values = inputs["pixel_values"].to(weight.device, weight.dtype)
        if pixel_values.shape[0] != queries.shape[0]:
            raise ValueError(f"inputs['pixel_values'] has {pixel_values.shape[0]} images for {queries.shape[0]} "
                             f"query samples")
        return pixel_values, inputs["pixel_mask"].to(weight.device), query_mask.to(weight.device).bool()

    def _check_targets(self, targets: list[dict], query_mask: torch.Tensor, device: torch.device) -> list[dict]:
        """Check labels against each sample's groups and move targets to ``device``."""
        if len(targets) != query_mask.shape[0]:
            raise ValueError(f"got {len(targets)} targets for {query_mask.shape[0]} samples")
        moved = []
        for i, target in enumerate(targets):
            labels = target["class_labels"].to(query_mask.device)
            if labels.numel() and (labels.max() >= query_mask.shape[1] or not query_mask[i, labels].all()):
                raise ValueError(f"targets[{i}] has labels {labels.tolist()} outside the sample's groups")
            moved.append({key: value.to(device) for key, value in target.items()})
        return moved

    def _group_modes(
        self,
        query_mask: torch.Tensor,
        route_ids: torch.Tensor | None,
        mode: str | list[str] | None,
        route_modes: Mapping[int, str] | None,
    ) -> torch.Tensor:
        """Mode codes ``[B, G]`` (index into ``MODES``; -1 on padding groups)."""
        batch, groups = query_mask.shape
        if mode is not None:
            per_sample = [mode] * batch if isinstance(mode, str) else list(mode)
            if len(per_sample) != batch:
                raise ValueError(f"mode has {len(per_sample)} entries for {batch} samples")
            self._check_modes(dict(enumerate(per_sample)), "mode")
            codes = torch.tensor([MODES.index(m) for m in per_sample], device=query_mask.device)
            codes = codes[:, None].expand(batch, groups)
        else:
            table = self._check_modes(dict(route_modes), "route_modes") if route_modes is not None else self.route_modes
            codes = torch.zeros(batch, groups, dtype=torch.long, device=query_mask.device)
            if route_ids is not None:
                for route_id, name in table.items():
                    codes = codes.masked_fill(route_ids.to(codes.device) == route_id, MODES.index(name))
        return codes.masked_fill(~query_mask.bool(), -1)

    @staticmethod
    def _check_modes(modes: dict[Any, str], field: str) -> dict[Any, str]:
        bad = {key: value for key, value in modes.items() if value not in MODES}
        if bad:
            raise ValueError(f"{field} must map to one of {MODES}, got {bad}")
        return modes


def _chunk_targets(targets: list[dict], start: int, end: int) -> list[dict]:
    """Targets whose labels fall in groups ``[start, end)``, relabelled from 0."""
    chunked = []
    for target in targets:
        keep = (target["class_labels"] >= start) & (target["class_labels"] < end)
        entry = {key: value[keep] for key, value in target.items()}
        entry["class_labels"] = entry["class_labels"] - start
        chunked.append(entry)
    return chunked


def _merge_chunks(
    outputs: list[GroundingOutput], chunks: list[tuple[int, int]], num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate the final-layer outputs of category chunks along the query axis.

    Returns:
        ``logits`` ``[B, Q', G]`` (``-inf`` outside a query's chunk), ``boxes`` ``[B, Q', 4]``, ``mask_embeds``
        ``[B, Q', d]`` and ``mask_features`` ``[n_chunks, B, d, h, w]``, with ``Q' = Q * n_chunks``.
    """
    logits = [
        torch.nn.functional.pad(out.logits[:, -1], (start, num_groups - end), value=float("-inf"))
        for out, (start, end) in zip(outputs, chunks)
    ]
    return (
        torch.cat(logits, dim=1),
        torch.cat([out.boxes[:, -1] for out in outputs], dim=1),
        torch.cat([out.mask_embeds[:, -1] for out in outputs], dim=1),
        torch.stack([out.mask_features for out in outputs]),
    )


def _mask_logits(
    mask_embeds: torch.Tensor, mask_features: torch.Tensor, query_idx: torch.Tensor, num_queries: int
) -> torch.Tensor:
    """Mask logits ``[n, h, w]`` of merged queries ``query_idx`` of one sample (``mask_embeds`` ``[Q', d]``,
    ``mask_features`` ``[n_chunks, d, h, w]``; query ``q`` belongs to chunk ``q // num_queries``)."""
    chunk = query_idx // num_queries  # [n]
    features = mask_features.flatten(2)  # [n_chunks, d, h*w]
    logits = features.new_zeros(query_idx.numel(), features.shape[-1])  # [n, h*w]
    for index in range(features.shape[0]):
        selected = chunk == index
        logits[selected] = mask_embeds[query_idx[selected]] @ features[index]
    return logits.view(-1, *mask_features.shape[-2:])
