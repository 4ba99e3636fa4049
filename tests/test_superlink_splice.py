"""Training splice, query-position mask and route-safe truncation, against naive per-position references."""

from __future__ import annotations

import random

import pytest
import torch

from superlink import RouteTable, locate_groups, placeholder_sequence, query_position_mask, splice_queries, truncate_ids

TABLE = RouteTable.default()
IDS = {t: 80 + i for i, t in enumerate(TABLE.route_tokens + TABLE.placeholder_tokens)}
BOUND = TABLE.bind(IDS.__getitem__)
PAD = 0


def group_ids(token: str) -> list[int]:
    return [IDS[token]] + [IDS[t] for t in placeholder_sequence(TABLE.route(token).num_embs)]


def random_batch(rng: random.Random) -> torch.Tensor:
    """A padded batch (random side) of 1-5 samples, each with 0-4 random route groups between text tokens."""
    seqs = []
    for _ in range(rng.randint(1, 5)):
        seq: list[int] = []
        for _ in range(rng.choice([0, 0, 1, 2, 4])):
            seq += [rng.randrange(3, 80) for _ in range(rng.randint(0, 5))] + group_ids(rng.choice(TABLE.route_tokens))
        seqs.append(seq + [rng.randrange(3, 80) for _ in range(rng.randint(0, 4))])
    length = max(len(s) for s in seqs) + rng.randint(0, 3)
    left = rng.random() < 0.5
    rows = [[PAD] * (length - len(s)) + s if left else s + [PAD] * (length - len(s)) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def naive_splice(embeds: torch.Tensor, input_ids: torch.Tensor, query_weight: torch.Tensor) -> torch.Tensor:
    out = embeds.clone()
    offsets = dict(zip(TABLE.tables, [0, 4, 8, 72]))
    for b, row in enumerate(input_ids.tolist()):
        for p, token in enumerate(row):
            route = next((r for r in TABLE.routes if IDS[r.token] == token), None)
            if route is not None:
                for j in range(route.num_embs):
                    out[b, p + 1 + j] = query_weight[offsets[route.table] + j]
    return out


def naive_mask(input_ids: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for b, row in enumerate(input_ids.tolist()):
        for p, token in enumerate(row):
            route = next((r for r in TABLE.routes if IDS[r.token] == token), None)
            if route is not None:
                mask[b, p + 1 : p + 1 + route.num_embs] = True
    return mask


def test_splice_equals_naive_on_random_batches() -> None:
    torch.manual_seed(0)
    rng = random.Random(0)
    query_weight = torch.randn(BOUND.total_queries, 8)
    for _ in range(150):
        input_ids = random_batch(rng)
        embeds = torch.randn(*input_ids.shape, 8)
        expected = naive_splice(embeds, input_ids, query_weight)
        assert torch.equal(splice_queries(embeds, input_ids, BOUND, query_weight), expected)
        assert torch.equal(splice_queries(embeds.clone(), input_ids, BOUND, query_weight, inplace=True), expected)
        assert torch.equal(query_position_mask(input_ids, BOUND), naive_mask(input_ids))


def test_splice_gradients_match_naive() -> None:
    torch.manual_seed(0)
    input_ids = torch.tensor([[5, *group_ids("[DET]"), 6, *group_ids("[GEN]"), 7, *group_ids("[SEG]"), 8],
                              [PAD] * 72 + [9, *group_ids("[POSE]"), 10]])
    embeds = torch.randn(*input_ids.shape, 8)
    query_weight = torch.randn(BOUND.total_queries, 8)
    probe = torch.randn(*input_ids.shape, 8)
    grads = []
    for fn in (lambda e, q: splice_queries(e, input_ids, BOUND, q), lambda e, q: naive_splice(e, input_ids, q)):
        e, q = embeds.clone().requires_grad_(), query_weight.clone().requires_grad_()
        (fn(e, q) * probe).sum().backward()
        grads.append((e.grad, q.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[0][1][:8].abs().sum() > 0 and grads[0][1][8:72].abs().sum() > 0  # det, pose and gen rows
    assert grads[0][1][72:].abs().sum() == 0  # no [EDIT] in the batch
    assert grads[0][0][naive_mask(input_ids)].abs().sum() == 0  # replaced placeholder embeddings get no gradient


def test_inplace_splice_keeps_autograd_to_query_weight() -> None:
    torch.manual_seed(0)
    input_ids = torch.tensor([[5, *group_ids("[DET]"), 6]])
    embedding = torch.nn.Embedding(100, 8)
    query_weight = torch.randn(BOUND.total_queries, 8, requires_grad=True)
    out = splice_queries(embedding(input_ids), input_ids, BOUND, query_weight, inplace=True)
    out.sum().backward()
    assert torch.equal(query_weight.grad[:4], torch.ones(4, 8)) and query_weight.grad[4:].abs().sum() == 0
    assert embedding.weight.grad[IDS["[EMB]"]].abs().sum() == 0 and embedding.weight.grad[5].abs().sum() > 0


def test_no_routes_is_identity_and_mask_keeps_route_labels() -> None:
    torch.manual_seed(0)
    plain = torch.tensor([[1, 2, 3], [PAD, 4, 5]])
    embeds = torch.randn(2, 3, 8)
    assert torch.equal(splice_queries(embeds, plain, BOUND, torch.randn(BOUND.total_queries, 8)), embeds)
    assert not query_position_mask(plain, BOUND).any()
    ids = torch.tensor([[7, *group_ids("[DET]"), 9]])
    assert query_position_mask(ids, BOUND).tolist() == [[False, False, True, True, True, True, False]]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ([5, IDS["[DET]"], IDS["[EMB]"], IDS["[EMB2]"], IDS["[EMB3]"], 6, 7],
         r"sample 1: route token \[DET\] at position 1"),
        ([5, 6, 7, 8, 9, IDS["[POSE]"], IDS["[EMB]"]], r"sample 1: route token \[POSE\] at position 5"),
        ([IDS["[DET]"], IDS["[EMB2]"], IDS["[EMB]"], IDS["[EMB3]"], IDS["[EMB4]"], 6, 7], "position 0"),
        ([5, IDS["[GEN]"], *[IDS["[EMB]"]] * 5], r"\[GEN\] at position 1 is not followed by its 64 placeholders"),
        ([5, *group_ids("[DET]"), IDS["[EMB]"]], "sample 1: placeholder at position 6 does not belong"),
    ],
)
def test_malformed_groups_raise(row: list[int], message: str) -> None:
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7], row])
    with pytest.raises(ValueError, match=message):
        splice_queries(torch.zeros(2, 7, 8), input_ids, BOUND, torch.zeros(BOUND.total_queries, 8))


def test_wrong_query_weight_shape_raises() -> None:
    with pytest.raises(ValueError, match=r"query_weight must be \[136, 8\]"):
        splice_queries(torch.zeros(1, 3, 8), torch.tensor([[1, 2, 3]]), BOUND, torch.zeros(8, 8))


def test_truncation_cases() -> None:
    det, gen = group_ids("[DET]"), group_ids("[GEN]")
    ids = [1, 2, *det, 3, *gen, 4]  # groups at 2..6 and 8..72, length 74
    assert truncate_ids(ids, 100, BOUND) == truncate_ids(ids, 74, BOUND)
    assert truncate_ids(ids, 74, BOUND).ids == ids and truncate_ids(ids, 74, BOUND).dropped_groups == 0
    cut = truncate_ids(ids, 40, BOUND)  # inside the [GEN] group: drop it whole
    assert cut.ids == [1, 2, *det, 3] and (cut.kept_groups, cut.dropped_groups) == (1, 1)
    assert truncate_ids(ids, 73, BOUND).ids == [1, 2, *det, 3, *gen]  # the group fits exactly
    assert truncate_ids(ids, 5, BOUND).ids == [1, 2]
    assert truncate_ids(ids, 7, BOUND).ids == [1, 2, *det]
    assert truncate_ids(ids, 3, BOUND).dropped_groups == 2
    assert truncate_ids(ids, 0, BOUND).ids == []
    with pytest.raises(ValueError, match="would drop 1 of 2 route groups"):
        truncate_ids(ids, 40, BOUND, raise_on_drop=True)
    assert truncate_ids(ids, 73, BOUND, raise_on_drop=True).kept_groups == 2
    with pytest.raises(ValueError, match="max_length must be >= 0"):
        truncate_ids(ids, -1, BOUND)


def test_truncation_never_leaves_a_partial_group() -> None:
    rng = random.Random(1)
    for _ in range(80):
        ids = [t for t in random_batch(rng)[0].tolist() if t != PAD]
        total = len(locate_groups(torch.tensor([ids], dtype=torch.long), BOUND).batch)
        for max_length in rng.sample(range(len(ids) + 2), min(len(ids) + 2, 24)):
            result = truncate_ids(ids, max_length, BOUND)
            assert len(result.ids) <= max_length and result.ids == ids[: len(result.ids)]
            kept = locate_groups(torch.tensor([result.ids], dtype=torch.long), BOUND)  # raises on a partial group
            assert len(kept.batch) == result.kept_groups and result.kept_groups + result.dropped_groups == total
            if len(result.ids) < min(max_length, len(ids)):  # shortened further only to drop one cut group
                assert result.ids + ids[len(result.ids) : max_length] == ids[:max_length]
                assert ids[len(result.ids)] in BOUND.k_by_id
                assert len(result.ids) + 1 + BOUND.k_by_id[ids[len(result.ids)]] > max_length


def test_empty_table_serves_chat_only_batches() -> None:
    empty = RouteTable.default().without_decoders(RouteTable.default().decoders)
    bound = empty.bind(IDS.__getitem__)
    ids = torch.tensor([[1, 2, IDS["[DET]"], 3]])  # [DET] is plain text for this table
    embeds = torch.randn(1, 4, 8)
    assert torch.equal(splice_queries(embeds, ids, bound, torch.zeros(0, 8)), embeds)
    assert truncate_ids(ids[0].tolist(), 3, bound).ids == [1, 2, IDS["[DET]"]]
