"""Hungarian set loss of the GroundingDINO decoder, on transformers' GroundingDINO matcher and loss terms.

transformers provides the matcher (focal class cost, L1 and GIoU box costs), the focal classification loss over the
valid text positions and the L1/GIoU box losses. This criterion adds point-sampled mask losses (BCE and dice, see
:mod:`.masks`), applies the mask losses to every decoder layer, adds the encoder-proposal outputs, and weights every
term (official weights: class 2, L1 5, GIoU 2, mask 5, dice 5).

The class targets are one-hot over category groups (each category has exactly one text position), so the label maps
are identity matrices. Losses are normalised by the number of target boxes of the local batch (no cross-process
reduction: ranks need not run this decoder on the same steps).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher, GroundingDinoImageLoss

from .config import GroundingDinoDecoderConfig
from .masks import dice_points, mask_logits_for, point_sample, sigmoid_bce_points, uncertain_point_coords

__all__ = ["SetCriterion"]


class SetCriterion(GroundingDinoImageLoss):
    """Matching and weighted losses over the final, auxiliary and encoder-proposal outputs.

    Args:
        config: costs, weights and mask point sampling settings.
    """

    def __init__(self, config: GroundingDinoDecoderConfig) -> None:
        matcher = GroundingDinoHungarianMatcher(
            class_cost=config.cost_class, bbox_cost=config.cost_bbox, giou_cost=config.cost_giou
        )
        super().__init__(matcher=matcher, focal_alpha=config.focal_alpha, losses=["labels", "boxes", "masks"])
        self.weights = {
            "loss_ce": config.loss_class,
            "loss_bbox": config.loss_bbox,
            "loss_giou": config.loss_giou,
            "loss_mask": config.loss_mask,
            "loss_dice": config.loss_dice,
        }
        self.mask_points = config.mask_points
        self.oversample_ratio = config.mask_oversample_ratio
        self.importance_ratio = config.mask_importance_ratio

    def _get_target_classes_one_hot(
        self, outputs: dict[str, Any], targets: list[dict], indices: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """``[B, Q, G]`` long one-hot class targets of the matched queries."""
        logits = outputs["logits"]
        batch_idx, query_idx = self._get_source_permutation_idx(indices)
        labels = torch.cat([t["class_labels"][j] for t, (_, j) in zip(targets, indices)])  # [N]
        one_hot = torch.zeros_like(logits, dtype=torch.long)  # [B, Q, G]
        one_hot[batch_idx, query_idx] = F.one_hot(labels, logits.shape[-1])
        return one_hot

    def loss_masks(
        self,
        outputs: dict[str, Any],
        targets: list[dict],
        indices: list[tuple[torch.Tensor, torch.Tensor]],
        num_boxes: float,
    ) -> dict[str, torch.Tensor]:
        """Point-sampled BCE and dice between matched queries' masks and target masks (samples with masks only).

        With no target mask in the batch, both terms are zero but still touch the mask head, so every parameter
        receives a gradient on every step.
        """
        indices = [
            (src, tgt) if "masks" in t else (src[:0], tgt[:0]) for t, (src, tgt) in zip(targets, indices)
        ]
        batch_idx, query_idx = self._get_source_permutation_idx(indices)
        if batch_idx.numel() == 0:
            zero = 0.0 * (outputs["mask_embeds"].sum() + outputs["mask_features"].sum())
            return {"loss_mask": zero, "loss_dice": zero}
        logits = mask_logits_for(outputs["mask_embeds"], outputs["mask_features"], batch_idx, query_idx)  # [N,h,w]
        target_masks = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices) if "masks" in t])
        coords = uncertain_point_coords(logits, self.mask_points, self.oversample_ratio, self.importance_ratio)
        point_logits = point_sample(logits, coords)  # [N, P]
        point_targets = point_sample(target_masks.to(logits.dtype), coords)  # [N, P]
        return {
            "loss_mask": sigmoid_bce_points(point_logits, point_targets, num_boxes),
            "loss_dice": dice_points(point_logits, point_targets, num_boxes),
        }

    def forward(self, outputs: dict[str, Any], targets: list[dict]) -> dict[str, torch.Tensor]:
        """Weighted loss terms.

        Args:
            outputs: ``layers``: per decoder layer (last = final) a dict with ``logits`` ``[B, Q, G]``, ``pred_boxes``
                ``[B, Q, 4]``, ``label_maps``, ``text_mask`` ``[B, Q, G]``, ``mask_embeds`` ``[B, Q, d]`` and
                ``mask_features`` ``[B, d, h, w]``; ``encoder``: the same keys without masks, or None.
            targets: per sample ``class_labels`` ``[N]``, ``boxes`` ``[N, 4]`` cxcywh, optional ``masks``
                ``[N, Hp, Wp]``.

        Returns:
            Weighted terms named ``loss_{ce,bbox,giou,mask,dice}`` (final layer), with ``_{i}`` (auxiliary layer i)
            or ``_enc`` (encoder proposals) suffixes.
        """
        num_boxes = float(max(sum(len(t["class_labels"]) for t in targets), 1))
        *aux, final = outputs["layers"]
        stages = [("", final)] + [(f"_{i}", layer) for i, layer in enumerate(aux)]
        if outputs.get("encoder") is not None:
            stages.append(("_enc", outputs["encoder"]))
        losses: dict[str, torch.Tensor] = {}
        for suffix, stage in stages:
            indices = self.matcher(stage, targets)
            for name in self.losses:
                if name == "masks" and "mask_embeds" not in stage:
                    continue
                terms = self.get_loss(name, stage, targets, indices, num_boxes)
                losses.update({key + suffix: value * self.weights[key] for key, value in terms.items()})
        return losses
