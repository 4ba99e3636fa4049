"""Bookkeeping for batched KV-cached decoding in which some samples route (no model code here).

Each decoding step, every unfinished sample feeds its last sampled token. A sample whose token is a route token also
feeds its K query embeddings in the same step (1 + K real positions); the other samples fill the step's width with
masked holes. The attention mask over the whole cache therefore has holes, and position ids count real positions
only, so each sample sees exactly the sequence it would see if decoded alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from superlink.routes import BoundRoutes

__all__ = ["DecodeStep", "prompt_position_ids", "build_step", "compact_steps"]


@dataclass
class DecodeStep:
    """The inputs of one decoding step of width W.

    Attributes:
        ids: ``[B, W]`` fed ids (the token, then the placeholder ids of its queries; ``pad_id`` in holes).
        embeds: ``[B, W, C]`` fed embeddings (the token's embedding, then the query rows; zeros in holes).
        mask: ``[B, W]`` True at real positions.
        position_ids: ``[B, W]`` position of each fed slot (next real position onwards).
        last_index: ``[B]`` index of each sample's last real slot (whose logits give the next token).
        num_real: ``[B]`` real positions per sample (0 for samples that do not feed).
    """

    ids: torch.Tensor
    embeds: torch.Tensor
    mask: torch.Tensor
    position_ids: torch.Tensor
    last_index: torch.Tensor
    num_real: torch.Tensor


def prompt_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a padded prompt: real tokens count from 0; padding gets 0.

    Args:
        attention_mask: ``[B, L]`` 1 at real tokens.
    Returns:
        ``[B, L]`` long position ids.
    """
    mask = attention_mask.long()  # [B, L]
    return ((mask.cumsum(1) - 1) * mask).clamp(min=0)


def _with_default(values: torch.Tensor, default: int) -> torch.Tensor:
    """``values`` (per route, first dim R) with one more entry ``default`` appended, selected by route index -1."""
    return torch.cat([values, values.new_full((1,) + values.shape[1:], default)])


def build_step(
    tokens: torch.Tensor,
    feed: torch.Tensor,
    token_embeds: torch.Tensor,
    next_position: torch.Tensor,
    bound: BoundRoutes,
    query_weight: torch.Tensor,
    pad_id: int = 0,
) -> DecodeStep:
    """Build one decoding step.

    Args:
        tokens: ``[B]`` last sampled token of each sample.
        feed: ``[B]`` bool, the samples that feed this step (others are all holes).
        token_embeds: ``[B, C]`` embeddings of ``tokens``.
        next_position: ``[B]`` position id of each sample's next real position.
        bound: the bound route table.
        query_weight: ``[Q, C]`` concatenated query tables.
        pad_id: id written in holes.
    Returns:
        The step inputs; width W = 1 + the largest K among the routing samples (1 if none routes).
    """
    bound = bound.to(tokens.device)
    route = bound.route_index(tokens)  # [B], -1 picks the appended "no route" entry below
    k = _with_default(bound.num_embs, 0)[route]  # [B]
    num_real = torch.where(feed, 1 + k, 0)  # [B]
    width = max(int(num_real.max()), 1) if num_real.numel() else 1
    slot = torch.arange(width, device=tokens.device)  # [W]
    mask = slot < num_real[:, None]  # [B, W]
    query = mask & (slot >= 1)  # [B, W]
    query_ids = _with_default(bound.query_ids, pad_id)[route, : width - 1]  # [B, W-1]
    ids = torch.cat([tokens[:, None], query_ids], dim=1).masked_fill(~mask, pad_id)  # [B, W]
    embeds = token_embeds[:, None].expand(-1, width, -1).masked_fill(~(mask & (slot == 0))[..., None], 0)  # [B, W, C]
    if bool(query.any()):
        rows = _with_default(bound.table_offset, 0)[route][:, None] + (slot - 1).clamp(min=0)  # [B, W]
        rows = rows.clamp(max=query_weight.shape[0] - 1)
        embeds = torch.where(query[..., None], query_weight[rows].to(embeds), embeds)  # [B, W, C]
    return DecodeStep(
        ids=ids,
        embeds=embeds,
        mask=mask,
        position_ids=next_position[:, None] + slot,
        last_index=(num_real - 1).clamp(min=0),
        num_real=num_real,
    )


def compact_steps(
    ids: torch.Tensor, hidden: torch.Tensor, valid: torch.Tensor, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Remove holes: move each sample's valid slots to the front, keeping their order.

    Args:
        ids: ``[B, S]`` ids of all steps, holes included.
        hidden: ``[B, S, C]`` hidden states of all steps.
        valid: ``[B, S]`` True at real slots.
        pad_id: id written after each sample's end.
    Returns:
        ``ids [B, T]``, ``hidden [B, T, C]`` (zeros after the end) and ``lengths [B]``, T = the longest length.
    """
    lengths = valid.sum(1)  # [B]
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices  # [B, S]
    total = int(lengths.max()) if lengths.numel() else 0
    order = order[:, :total]  # [B, T]
    keep = torch.arange(total, device=ids.device) < lengths[:, None]  # [B, T]
    ids = torch.where(keep, ids.gather(1, order), pad_id)  # [B, T]
    hidden = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, T, C]
    hidden = torch.where(keep[..., None], hidden, 0)  # [B, T, C]
    return ids, hidden, lengths
