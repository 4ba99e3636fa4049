"""Super-link splice and gather: the vectorised implementation against the official per-sample algorithm.

Both run side by side in one process on the same batch and must produce identical tensors. The baseline follows the
official code: for every sample and every route position, ``torch.cat`` the prefix, the K query rows and the suffix
(ids and embeddings) to insert the queries, then stack the batch; gather with a per-sample, per-route loop, padded per
decoder. Ours replaces the placeholders already present in the ids in one indexed write, and gathers with one
indexed read per decoder.

Usage: ``python benchmarks/superlink.py [--batch 16 --length 2048 --dim 1024 --routes 8 --long-routes 2]``.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from superlink import BoundRoutes, RouteTable, gather_queries, placeholder_sequence, splice_queries  # noqa: E402

TEXT_VOCAB = 32000  # a Llama-size text vocabulary; route and placeholder tokens take the ids after it


def build_batch(
    table: RouteTable, ids: dict[str, int], args: argparse.Namespace
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ids with route groups (ours) and the same ids without placeholders (baseline), with embeddings.

    Returns:
        ``full_ids [B, L]``, ``full_embeds [B, L, C]`` (placeholder rows hold the placeholder embedding), and
        ``short_ids [B, L - Mq]``, ``short_embeds [B, L - Mq, C]``: the same rows without the placeholder positions.
    """
    rng = random.Random(args.seed)
    short_k = [t for t in table.route_tokens if table.route(t).num_embs <= 8]
    long_k = [t for t in table.route_tokens if table.route(t).num_embs > 8]
    rows = []
    for _ in range(args.batch):
        tokens = [rng.choice(long_k) for _ in range(args.long_routes)]
        tokens += [rng.choice(short_k) for _ in range(args.routes - args.long_routes)]
        rng.shuffle(tokens)
        text = args.length - sum(1 + table.route(t).num_embs for t in tokens)
        cuts = sorted(rng.sample(range(1, text), len(tokens)))
        row: list[int] = []
        previous = 0
        for cut, token in zip(cuts, tokens):
            row += [rng.randrange(3, TEXT_VOCAB) for _ in range(cut - previous)]
            row += [ids[token]] + [ids[p] for p in placeholder_sequence(table.route(token).num_embs)]
            previous = cut
        rows.append(row + [rng.randrange(3, TEXT_VOCAB) for _ in range(text - previous)])
    full_ids = torch.tensor(rows, device=args.device)  # [B, L]
    full_embeds = torch.randn(*full_ids.shape, args.dim, generator=torch.Generator().manual_seed(args.seed))
    full_embeds = full_embeds.to(args.device)  # [B, L, C]
    keep = full_ids < ids[table.placeholder_tokens[0]]  # [B, L]: no placeholder ids
    short_ids = full_ids[keep].view(args.batch, -1)  # [B, L - Mq]
    short_embeds = full_embeds[keep].view(args.batch, -1, args.dim)  # [B, L - Mq, C]
    return full_ids, full_embeds, short_ids, short_embeds


def official_splice(
    input_ids: torch.Tensor,
    inputs_embeds: torch.Tensor,
    routes: dict[int, tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official algorithm: per sample, per route position, insert the K placeholder ids and query rows.

    Args:
        input_ids: ``[B, L0]`` ids without placeholders.
        inputs_embeds: ``[B, L0, C]``.
        routes: route token id -> (placeholder ids ``[K]``, query table ``[K, C]``).
    Returns:
        ``ids [B, L]`` and ``embeds [B, L, C]`` with the queries inserted after every route token.
    """
    route_ids = torch.tensor(list(routes), device=input_ids.device)
    new_ids, new_embeds = [], []
    for cur_ids, cur_embeds in zip(input_ids, inputs_embeds):
        positions = torch.where(torch.isin(cur_ids, route_ids))[0].tolist()
        shift = 0
        for position in positions:
            p = position + shift
            placeholder_ids, table = routes[int(cur_ids[p])]
            cur_ids = torch.cat([cur_ids[: p + 1], placeholder_ids, cur_ids[p + 1 :]])
            cur_embeds = torch.cat([cur_embeds[: p + 1], table, cur_embeds[p + 1 :]])
            shift += table.shape[0]
        new_ids.append(cur_ids)
        new_embeds.append(cur_embeds)
    return torch.stack(new_ids), torch.stack(new_embeds)


def official_gather(
    hidden: torch.Tensor, input_ids: torch.Tensor, table: RouteTable, ids: dict[str, int]
) -> dict[str, torch.Tensor]:
    """The official per-sample gather loop: slice each group's K states, stack, zero-pad per decoder.

    Returns:
        decoder name -> ``[B_d, G, K, C]`` over the samples having groups for that decoder.
    """
    by_id = {ids[r.token]: r for r in table.routes}
    route_ids = torch.tensor(list(by_id), device=input_ids.device)
    per_decoder: dict[str, list[torch.Tensor]] = {}
    for cur_hidden, cur_ids in zip(hidden, input_ids):
        positions = torch.where(torch.isin(cur_ids, route_ids))[0].tolist()
        tokens = [by_id[int(cur_ids[p])] for p in positions]
        present = {r.token for r in tokens}
        groups: dict[str, list[torch.Tensor]] = {}
        for p, route in zip(positions, tokens):
            absorber = next((r for r in table.routes if route.token in r.absorbs and r.token in present), route)
            groups.setdefault(absorber.decoder, []).append(cur_hidden[p + 1 : p + 1 + route.num_embs])
        for decoder, states in groups.items():
            per_decoder.setdefault(decoder, []).append(torch.stack(states))
    out = {}
    for decoder, samples in per_decoder.items():
        count = max(s.shape[0] for s in samples)
        padded = [torch.cat([s, s.new_zeros((count - s.shape[0],) + s.shape[1:])]) for s in samples]
        out[decoder] = torch.stack(padded)
    return out


def median_ms(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Median wall time of ``fn`` in milliseconds (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--routes", type=int, default=8, help="route groups per sample")
    parser.add_argument("--long-routes", type=int, default=2, help="of which with K = 64 ([GEN]/[EDIT])")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    table = RouteTable.default()
    ids = {t: TEXT_VOCAB + i for i, t in enumerate(table.route_tokens + table.placeholder_tokens)}
    bound: BoundRoutes = table.bind(ids.__getitem__).to(args.device)
    full_ids, full_embeds, short_ids, short_embeds = build_batch(table, ids, args)
    query_weight = torch.randn(bound.total_queries, args.dim, device=args.device)  # [Q, C]
    offsets = dict(zip(table.tables, [sum(list(table.tables.values())[:i]) for i in range(len(table.tables))]))
    routes = {
        ids[r.token]: (
            torch.tensor([ids[p] for p in placeholder_sequence(r.num_embs)], device=args.device),
            query_weight[offsets[r.table] : offsets[r.table] + r.num_embs],
        )
        for r in table.routes
    }

    base_ids, base_embeds = official_splice(short_ids, short_embeds, routes)
    ours = splice_queries(full_embeds.clone(), full_ids, bound, query_weight, inplace=True)
    assert torch.equal(base_ids, full_ids), "baseline ids differ"
    max_abs_diff = float((base_embeds - ours).abs().max())
    copied = splice_queries(full_embeds, full_ids, bound, query_weight)  # the out-of-place mode gives the same
    max_abs_diff = max(max_abs_diff, float((copied - ours).abs().max()))

    work = full_embeds.clone()
    baseline_ms = median_ms(lambda: official_splice(short_ids, short_embeds, routes), args.repeats, args.device)
    ours_ms = median_ms(
        lambda: splice_queries(work, full_ids, bound, query_weight, inplace=True), args.repeats * 4, args.device
    )
    ours_copy_ms = median_ms(
        lambda: splice_queries(full_embeds, full_ids, bound, query_weight), args.repeats * 4, args.device
    )

    hidden = torch.randn_like(full_embeds)  # [B, L, C]
    base_groups = official_gather(hidden, full_ids, table, ids)
    our_groups = gather_queries(hidden, full_ids, bound)
    assert set(base_groups) == set(our_groups), "gather decoders differ"
    gather_diff = max(float((base_groups[d] - our_groups[d].states).abs().max()) for d in base_groups)
    gather_base_ms = median_ms(lambda: official_gather(hidden, full_ids, table, ids), args.repeats, args.device)
    gather_ours_ms = median_ms(lambda: gather_queries(hidden, full_ids, bound), args.repeats * 4, args.device)

    result = {
        "splice_speedup": round(baseline_ms / ours_ms, 2),
        "gather_speedup": round(gather_base_ms / gather_ours_ms, 2),
        "max_abs_diff": max_abs_diff,
        "gather_max_abs_diff": gather_diff,
        "splice_copy_speedup": round(baseline_ms / ours_copy_ms, 2),
        "baseline_splice_ms": round(baseline_ms, 3),
        "ours_splice_ms": round(ours_ms, 3),
        "ours_splice_copy_ms": round(ours_copy_ms, 3),
        "baseline_gather_ms": round(gather_base_ms, 3),
        "ours_gather_ms": round(gather_ours_ms, 3),
        "batch": args.batch,
        "length": args.length,
        "dim": args.dim,
        "routes_per_sample": args.routes,
        "long_routes_per_sample": args.long_routes,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
