"""Hungarian matching and losses of the keypoint decoder.

Every decoder layer (and the encoder proposals) is matched to the targets on its own with scipy's
``linear_sum_assignment``. Costs: focal class cost, box L1, -GIoU and, for layers that predict keypoints, the mean
keypoint L1 over labelled keypoints and 1 - OKS. Losses: sigmoid focal loss over the object groups, box L1, GIoU,
keypoint L1 (mean over the labelled keypoints of each instance), 1 - OKS and a visibility BCE (target: the keypoint is
labelled, v > 0), each with its own weight. Every term is summed over matched instances and divided by the number of
target instances of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from .config import KeypointDecoderConfig
from .oks import keypoint_oks

__all__ = ["LayerOutput", "PoseCriterion", "LOSS_NAMES", "normalized_keypoint_oks"]

LOSS_NAMES = ("loss_class", "loss_bbox", "loss_giou", "loss_keypoint", "loss_oks", "loss_visibility")


@dataclass
class LayerOutput:
    """Predictions of one decoder layer (or of the encoder proposals).

    Attributes:
        logits: [B, Q, Go] class logits over the object groups (finite; padded groups are masked by consumers).
        boxes: [B, Q, 4] normalised cxcywh boxes.
        keypoints: [B, Q, Kp, 2] normalised (x, y), or None before the pose stage.
        visibility_logits: [B, Q, Kp], or None before the pose stage.
    """

    logits: torch.Tensor
    boxes: torch.Tensor
    keypoints: torch.Tensor | None = None
    visibility_logits: torch.Tensor | None = None


def normalized_keypoint_oks(
    pred_xy: torch.Tensor, gt: torch.Tensor, areas: torch.Tensor, sigmas: torch.Tensor, boxes: torch.Tensor,
    keypoint_mask: torch.Tensor, size_wh: torch.Tensor,
) -> torch.Tensor:
    """OKS of normalised predictions against normalised targets, measured in original pixels.

    Args:
        pred_xy: [..., Kp, 2] normalised (x, y); gt: [..., Kp, 3] normalised (x, y) and v.
        areas: [...] object areas in original pixels^2; sigmas: [..., Kp]; boxes: [..., 4] normalised cxcywh.
        keypoint_mask: [..., Kp] bool real keypoint slots; size_wh: [..., 2] original (width, height).
    Returns:
        [...] OKS, as :func:`keypoint_oks` on the same data in pixels.
    """
    xy_scale = size_wh[..., None, :]  # [..., 1, 2]
    gt_px = torch.cat([gt[..., :2] * xy_scale, gt[..., 2:]], -1)  # [..., Kp, 3]
    box_xywh = box_convert(boxes, "cxcywh", "xywh") * torch.cat([size_wh, size_wh], -1)  # [..., 4]
    return keypoint_oks(pred_xy * xy_scale, gt_px, areas, sigmas, box_xywh, keypoint_mask)


class PoseCriterion:
    """Matches predictions to targets and computes the weighted losses of every layer.

    Args:
        cfg: decoder config (costs, weights, focal parameters).
    """

    def __init__(self, cfg: KeypointDecoderConfig) -> None:
        self.cfg = cfg

    def __call__(
        self,
        layers: list[LayerOutput],
        targets: dict[str, torch.Tensor],
        class_mask: torch.Tensor,
        keypoint_mask: torch.Tensor,
        orig_sizes: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum of the weighted losses of all ``layers``.

        Args:
            layers: outputs of the encoder proposals and every decoder layer.
            targets: padded targets from :func:`prepare_targets`.
            class_mask: [B, Go] bool, real object groups.
            keypoint_mask: [B, Kp] bool, real keypoint groups.
            orig_sizes: [B, 2] original (height, width).
        Returns:
            total loss and the per-term sums over layers (weighted).
        """
        size_wh = orig_sizes.flip(-1).to(layers[-1].boxes.dtype)  # [B, 2]
        num_instances = targets["instance_mask"].sum().clamp(min=1).to(size_wh.dtype)
        totals = {name: size_wh.new_zeros(()) for name in LOSS_NAMES}
        for out in layers:
            indices = self.match(out, targets, class_mask, keypoint_mask, size_wh)
            for name, value in self.losses(out, targets, indices, class_mask, keypoint_mask, size_wh).items():
                totals[name] = totals[name] + value / num_instances
        return sum(totals.values()), totals

    @torch.no_grad()
    def match(
        self,
        out: LayerOutput,
        targets: dict[str, torch.Tensor],
        class_mask: torch.Tensor,
        keypoint_mask: torch.Tensor,
        size_wh: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hungarian matching; returns flat (batch, query, target) index tensors of the matched pairs."""
        cfg = self.cfg
        prob = F.pad(out.logits.float().sigmoid(), (0, 1))  # [B, Q, Go + 1], the extra column for padding
        labels = targets["labels"].masked_fill(targets["labels"] < 0, prob.shape[-1] - 1)  # [B, N]
        p = prob.gather(2, labels[:, None].expand(-1, prob.shape[1], -1))  # [B, Q, N]
        neg = (1 - cfg.focal_alpha) * p**cfg.focal_gamma * -(1 - p + 1e-8).log()
        pos = cfg.focal_alpha * (1 - p) ** cfg.focal_gamma * -(p + 1e-8).log()
        cost = cfg.cost_class * (pos - neg)  # [B, Q, N]

        boxes, tgt_boxes = out.boxes.float(), targets["boxes"]  # [B, Q, 4], [B, N, 4]
        cost = cost + cfg.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
        giou = generalized_box_iou(
            box_convert(boxes.flatten(0, 1), "cxcywh", "xyxy"), box_convert(tgt_boxes.flatten(0, 1), "cxcywh", "xyxy")
        ).view(*boxes.shape[:2], *tgt_boxes.shape[:2])  # [B, Q, B, N]
        giou = giou.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [B, Q, N]
        cost = cost - cfg.cost_giou * giou

        if out.keypoints is not None and out.keypoints.shape[2] > 0:
            kpts, tgt = out.keypoints.float(), targets["keypoints"]  # [B, Q, Kp, 2], [B, N, Kp, 3]
            vis = (tgt[..., 2] > 0) & keypoint_mask[:, None]  # [B, N, Kp]
            l1 = (kpts[:, :, None] - tgt[:, None, ..., :2]).abs().sum(-1)  # [B, Q, N, Kp]
            l1 = (l1 * vis[:, None]).sum(-1) / vis.sum(-1).clamp(min=1)[:, None]  # [B, Q, N]
            oks = normalized_keypoint_oks(
                kpts[:, :, None], tgt[:, None], targets["areas"][:, None], targets["sigmas"][:, None, None],
                tgt_boxes[:, None], keypoint_mask[:, None, None], size_wh[:, None, None],
            )  # [B, Q, N]
            cost = cost + cfg.cost_keypoint * l1 + cfg.cost_oks * (1 - oks)

        cost = cost.cpu()
        counts = targets["instance_mask"].sum(-1).tolist()
        pairs = [linear_sum_assignment(cost[b, :, :n].numpy()) for b, n in enumerate(counts)]
        batch = torch.cat([torch.full((len(q),), b, dtype=torch.long) for b, (q, _) in enumerate(pairs)])
        query = torch.cat([torch.as_tensor(q, dtype=torch.long) for q, _ in pairs])
        target = torch.cat([torch.as_tensor(t, dtype=torch.long) for _, t in pairs])
        device = out.boxes.device
        return batch.to(device), query.to(device), target.to(device)

    def losses(
        self,
        out: LayerOutput,
        targets: dict[str, torch.Tensor],
        indices: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        class_mask: torch.Tensor,
        keypoint_mask: torch.Tensor,
        size_wh: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Weighted loss sums (not yet divided by the number of instances) of one layer."""
        cfg = self.cfg
        b, q, n = indices
        labels = targets["labels"][b, n]  # [M]
        onehot = torch.zeros_like(out.logits)  # [B, Q, Go]
        onehot[b, q, labels] = 1
        focal = sigmoid_focal_loss(out.logits, onehot, cfg.focal_alpha, cfg.focal_gamma, reduction="none")
        losses = {"loss_class": cfg.loss_class * (focal * class_mask[:, None]).sum()}

        boxes, tgt_boxes = out.boxes[b, q], targets["boxes"][b, n]  # [M, 4]
        losses["loss_bbox"] = cfg.loss_bbox * (boxes - tgt_boxes).abs().sum()
        losses["loss_giou"] = cfg.loss_giou * generalized_box_iou_loss(
            box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"), reduction="sum"
        )
        if out.keypoints is None or out.keypoints.shape[2] == 0:
            return losses

        kpts, vis_logits = out.keypoints[b, q], out.visibility_logits[b, q]  # [M, Kp, 2], [M, Kp]
        tgt, valid = targets["keypoints"][b, n], keypoint_mask[b]  # [M, Kp, 3], [M, Kp]
        labelled = (tgt[..., 2] > 0) & valid  # [M, Kp]
        l1 = ((kpts - tgt[..., :2]).abs().sum(-1) * labelled).sum(-1) / labelled.sum(-1).clamp(min=1)  # [M]
        losses["loss_keypoint"] = cfg.loss_keypoint * l1.sum()
        oks = normalized_keypoint_oks(
            kpts, tgt, targets["areas"][b, n], targets["sigmas"][b], tgt_boxes, valid, size_wh[b]
        )  # [M]
        losses["loss_oks"] = cfg.loss_oks * ((1 - oks) * labelled.any(-1)).sum()
        bce = F.binary_cross_entropy_with_logits(vis_logits, labelled.to(vis_logits.dtype), reduction="none")
        losses["loss_visibility"] = cfg.loss_visibility * ((bce * valid).sum(-1) / valid.sum(-1).clamp(min=1)).sum()
        return losses
