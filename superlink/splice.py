"""Training-time splice: replace the placeholders after every route token with the route's query embeddings.

All functions work on a whole padded batch at once (either padding side, any mix of routes, no routes at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from superlink.routes import BoundRoutes

__all__ = ["RouteGroups", "locate_groups", "splice_queries", "query_position_mask", "Truncation", "truncate_ids"]


@dataclass
class RouteGroups:
    """Every route occurrence of a batch (N groups, M = sum of their K query positions), in text order.

    Attributes:
        batch: ``[N]`` sample of each group.
        position: ``[N]`` position of the route token.
        route: ``[N]`` route index (into the route table).
        query_batch: ``[M]`` sample of each query position.
        query_position: ``[M]`` position of each query (``position + 1 + slot``).
        query_row: ``[M]`` row of the concatenated query weight for each query position.
    """

    batch: torch.Tensor
    position: torch.Tensor
    route: torch.Tensor
    query_batch: torch.Tensor
    query_position: torch.Tensor
    query_row: torch.Tensor


def locate_groups(input_ids: torch.Tensor, bound: BoundRoutes) -> RouteGroups:
    """Find all route groups of a batch and check that each route token is followed by exactly its placeholders.

    Args:
        input_ids: ``[B, L]`` token ids.
        bound: the bound route table.
    Returns:
        The groups, ordered by sample then position.
    Raises:
        ValueError: a route token not followed by its K placeholders, or a placeholder outside any group (the message
            names the sample index and position).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    bound = bound.to(input_ids.device)
    seq_len = input_ids.shape[1]
    flat_ids = input_ids.reshape(-1)  # [B*L]
    route_of = bound.route_index(flat_ids)  # [B*L]
    start = (route_of >= 0).nonzero().squeeze(1)  # [N] flat position of each route token
    batch, position = start // seq_len, start % seq_len  # [N], [N]
    route = route_of.index_select(0, start)  # [N]
    k = bound.num_embs.index_select(0, route)  # [N]
    first = torch.cumsum(k, 0) - k  # [N] first query index of each group
    total = int(k.sum())
    group = torch.zeros(total, dtype=torch.long, device=k.device).index_fill_(0, first[1:], 1).cumsum(0)  # [M]
    slot = torch.arange(total, device=k.device) - first.index_select(0, group)  # [M]
    query_position = position.index_select(0, group) + 1 + slot  # [M]
    query_flat = (start.index_select(0, group) + 1 + slot).clamp(max=max(flat_ids.numel() - 1, 0))  # [M]
    found = flat_ids.index_select(0, query_flat)  # [M]
    want = bound.query_ids.reshape(-1).index_select(0, route.index_select(0, group) * bound.query_ids.shape[1] + slot)
    wrong = (query_position >= seq_len) | (found != want)  # [M]
    if bool(wrong.any()):
        g = int(group[wrong.nonzero()[0, 0]])
        r = bound.table.routes[int(route[g])]
        raise ValueError(
            f"sample {int(batch[g])}: route token {r.token} at position {int(position[g])} is not followed by its "
            f"{r.num_embs} placeholders"
        )
    query_batch = batch.index_select(0, group)  # [M]
    stray = bound.is_placeholder(input_ids)  # [B, L]
    if int(stray.sum()) != group.numel():
        stray[query_batch, query_position] = False
        b, p = (int(v) for v in stray.nonzero()[0])
        raise ValueError(f"sample {b}: placeholder at position {p} does not belong to a route token's query group")
    query_row = bound.table_offset.index_select(0, route).index_select(0, group) + slot  # [M]
    return RouteGroups(batch, position, route, query_batch, query_position, query_row)


def splice_queries(
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    bound: BoundRoutes,
    query_weight: torch.Tensor,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """Replace the K placeholder embeddings after every route token with that route's query rows, in one operation.

    Args:
        inputs_embeds: ``[B, L, C]`` token embeddings.
        input_ids: ``[B, L]`` token ids (route tokens followed by their placeholders).
        bound: the bound route table.
        query_weight: ``[Q, C]`` the query tables concatenated in ``RouteTable.tables`` order.
        inplace: write into ``inputs_embeds`` (valid when it is a fresh non-leaf tensor, e.g. the output of the
            embedding layer; autograd still reaches ``query_weight``). Saves a copy of the whole batch.
    Returns:
        ``[B, L, C]`` embeddings with the query rows spliced in.
    """
    if inputs_embeds.shape[:2] != input_ids.shape:
        raise ValueError(
            f"inputs_embeds {tuple(inputs_embeds.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    if query_weight.dim() != 2 or query_weight.shape != (bound.total_queries, inputs_embeds.shape[-1]):
        raise ValueError(
            f"query_weight must be [{bound.total_queries}, {inputs_embeds.shape[-1]}] (tables {bound.table.tables}), "
            f"got {tuple(query_weight.shape)}"
        )
    groups = locate_groups(input_ids, bound)
    rows = query_weight.index_select(0, groups.query_row.to(query_weight.device)).to(inputs_embeds)  # [M, C]
    index = (groups.query_batch, groups.query_position)
    if inplace:
        return inputs_embeds.index_put_(index, rows)
    return inputs_embeds.index_put(index, rows)


def query_position_mask(input_ids: torch.Tensor, bound: BoundRoutes) -> torch.Tensor:
    """Bool ``[B, L]`` mask of query (placeholder) positions; set their labels to -100.

    The route token and the token after the queries are not in the mask: they keep their labels.
    """
    groups = locate_groups(input_ids, bound)
    mask = torch.zeros_like(input_ids, dtype=torch.bool)  # [B, L]
    mask[groups.query_batch, groups.query_position] = True
    return mask


@dataclass
class Truncation:
    """Result of :func:`truncate_ids`.

    Attributes:
        ids: the truncated ids (``len(ids) <= max_length``); truncate parallel lists (labels) to ``len(ids)``.
        kept_groups: route groups left, all complete: the first ``kept_groups`` groups of the input.
        dropped_groups: route groups removed (cut or beyond ``max_length``); drop the targets of the last
            ``dropped_groups`` groups.
    """

    ids: list[int]
    kept_groups: int
    dropped_groups: int


def truncate_ids(
    ids: Sequence[int], max_length: int, bound: BoundRoutes, *, raise_on_drop: bool = False
) -> Truncation:
    """Truncate a token id list on the right without leaving a route token with fewer than K placeholders.

    A group (route token + its K placeholders) that would be cut is removed entirely: the result ends just before
    that route token, so it can be shorter than ``max_length``.

    Args:
        ids: token ids of one sample.
        max_length: the maximum length (>= 0).
        bound: the bound route table.
        raise_on_drop: raise instead of dropping groups.
    Returns:
        The truncated ids and how many route groups were kept and dropped.
    Raises:
        ValueError: ``max_length`` < 0, or a group would be dropped and ``raise_on_drop`` is set.
    """
    if max_length < 0:
        raise ValueError(f"max_length must be >= 0, got {max_length}")
    starts = [(i, bound.k_by_id[t]) for i, t in enumerate(ids) if t in bound.k_by_id]
    cut = min(len(ids), max_length)
    kept_starts = [(i, k) for i, k in starts if i < cut]
    if kept_starts and kept_starts[-1][0] + kept_starts[-1][1] + 1 > cut:
        cut = kept_starts.pop()[0]
    dropped = len(starts) - len(kept_starts)
    if dropped and raise_on_drop:
        raise ValueError(
            f"truncating {len(ids)} ids to max_length={max_length} would drop {dropped} of {len(starts)} route groups"
        )
    return Truncation(list(ids[:cut]), len(kept_starts), dropped)
