"""Gather the LLM hidden states at query positions into per-decoder ``[B_d, G, K, C]`` tensors.

The same function serves training (teacher-forced ids and the LLM's hidden states) and generation (the generated ids,
which hold the placeholder ids at query positions, and the hidden states captured while decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from superlink.routes import BoundRoutes
from superlink.splice import locate_groups

__all__ = ["QueryGroups", "gather_queries"]


@dataclass
class QueryGroups:
    """The query groups of one decoder (B_d samples with at least one group, G groups at most, K queries).

    Attributes:
        states: ``[B_d, G, K, C]`` hidden states at the query positions (zeros on padding groups).
        mask: ``[B_d, G]`` True for real groups.
        batch_index: ``[B_d]`` index of each sample in the batch.
        route_ids: ``[B_d, G]`` route token id of each group, -1 on padding.
        positions: ``[B_d, G]`` position of each group's route token, -1 on padding.
        absorbed: ``[B_d, G]`` True for groups of a route absorbed by another route of this decoder (e.g. the
            object-class groups of a pose sample).
    """

    states: torch.Tensor
    mask: torch.Tensor
    batch_index: torch.Tensor
    route_ids: torch.Tensor
    positions: torch.Tensor
    absorbed: torch.Tensor


def gather_queries(hidden: torch.Tensor, input_ids: torch.Tensor, bound: BoundRoutes) -> dict[str, QueryGroups]:
    """Collect the query states of every route group, per decoder; group order is the order in the text.

    In a sample containing a route that absorbs other routes, the absorbed routes' groups go to the absorber's decoder.

    Args:
        hidden: ``[B, L, C]`` hidden states (last layer, after the final norm).
        input_ids: ``[B, L]`` ids at the same positions.
        bound: the bound route table.
    Returns:
        decoder name -> its groups, for the decoders with at least one group in the batch.
    """
    if hidden.shape[:2] != input_ids.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match input_ids {tuple(input_ids.shape)}")
    bound = bound.to(input_ids.device)
    groups = locate_groups(input_ids, bound)
    batch, position, route = groups.batch, groups.position, groups.route  # [N]
    present = torch.zeros(input_ids.shape[0], len(bound.table), dtype=torch.bool, device=input_ids.device)  # [B, R]
    present[batch, route] = True
    absorber = bound.absorber[route]  # [N]
    absorbed = (absorber >= 0) & present[batch, absorber.clamp(min=0)]  # [N]
    decoder = torch.where(absorbed, bound.decoder_index[absorber.clamp(min=0)], bound.decoder_index[route])  # [N]
    out: dict[str, QueryGroups] = {}
    for index, name in enumerate(bound.table.decoders):
        select = (decoder == index).nonzero().squeeze(1)  # [n]
        if select.numel() == 0:
            continue
        out[name] = _pack(
            hidden,
            batch[select],
            position[select],
            bound.route_ids[route[select]],
            absorbed[select],
            bound.table.decoder_num_embs(name),
        )
    return out


def _pack(
    hidden: torch.Tensor,
    batch: torch.Tensor,
    position: torch.Tensor,
    route_ids: torch.Tensor,
    absorbed: torch.Tensor,
    num_embs: int,
) -> QueryGroups:
    """Pack n groups (sorted by sample) of one decoder into padded ``[B_d, G, K, C]`` tensors with one read."""
    seq_len, width = hidden.shape[1], hidden.shape[2]
    samples, counts = torch.unique_consecutive(batch, return_counts=True)  # [B_d], [B_d]
    first = torch.cumsum(counts, 0) - counts  # [B_d] first group of each sample
    rows = torch.zeros(batch.numel(), dtype=torch.long, device=batch.device).index_fill_(0, first[1:], 1).cumsum(0)
    num_groups = int(counts.max())
    cell = rows * num_groups + torch.arange(batch.numel(), device=batch.device) - first.index_select(0, rows)  # [n]
    cells = samples.numel() * num_groups

    def scatter(values: torch.Tensor, fill: int | bool) -> torch.Tensor:
        out = torch.full((cells,), fill, dtype=values.dtype, device=values.device)  # [B_d*G]
        return out.index_copy_(0, cell, values).view(samples.numel(), num_groups)

    mask = scatter(torch.ones_like(absorbed), False)  # [B_d, G]
    source = scatter(batch * seq_len + position + 1, 0).reshape(-1)  # [B_d*G] flat position of the first query
    index = source[:, None] + torch.arange(num_embs, device=batch.device)  # [B_d*G, K]
    states = hidden.reshape(-1, width).index_select(0, index.reshape(-1))  # [B_d*G*K, C]
    if cells > batch.numel():  # zero the padding groups
        states = states.view(cells, -1).index_fill_(0, (~mask).reshape(-1).nonzero().squeeze(1), 0)
    return QueryGroups(
        states=states.view(samples.numel(), num_groups, num_embs, width),
        mask=mask,
        batch_index=samples,
        route_ids=scatter(route_ids, -1),
        positions=scatter(position, -1),
        absorbed=scatter(absorbed, False),
    )
