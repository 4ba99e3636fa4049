"""Gather of query states per decoder, against a naive loop; the training path end to end through a tiny Llama."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from superlink import RouteTable, gather_queries, placeholder_sequence, query_position_mask, splice_queries

TABLE = RouteTable.default()
IDS = {t: 80 + i for i, t in enumerate(TABLE.route_tokens + TABLE.placeholder_tokens)}
BOUND = TABLE.bind(IDS.__getitem__)
PAD = 0


def group_ids(token: str) -> list[int]:
    return [IDS[token]] + [IDS[t] for t in placeholder_sequence(TABLE.route(token).num_embs)]


def random_batch(rng: random.Random) -> torch.Tensor:
    """A padded batch of 1-6 samples: chat, det/seg/grd, pose (with [DET] object groups), gen or edit."""
    kinds = {
        "chat": [], "det": ["[DET]", "[SEG]", "[GRD]"], "pose": ["[DET]", "[POSE]"], "gen": ["[GEN]"],
        "edit": ["[EDIT]"],
    }
    seqs = []
    for _ in range(rng.randint(1, 6)):
        tokens = kinds[rng.choice(list(kinds))]
        seq: list[int] = []
        for _ in range(rng.randint(1, 4) if tokens else 0):
            seq += [rng.randrange(3, 80) for _ in range(rng.randint(0, 3))] + group_ids(rng.choice(tokens))
        seqs.append(seq + [rng.randrange(3, 80) for _ in range(rng.randint(1, 3))])
    length = max(len(s) for s in seqs)
    left = rng.random() < 0.5
    return torch.tensor([[PAD] * (length - len(s)) + s if left else s + [PAD] * (length - len(s)) for s in seqs])


def naive_gather(hidden: torch.Tensor, input_ids: torch.Tensor) -> dict[str, list[tuple[int, list[tuple]]]]:
    """decoder -> [(sample, [(route id, position, absorbed, states [K, C]), ...]), ...] by plain loops."""
    by_id = {IDS[r.token]: r for r in TABLE.routes}
    out: dict[str, list] = {}
    for b, row in enumerate(input_ids.tolist()):
        tokens = {by_id[t].token for t in row if t in by_id}
        per_decoder: dict[str, list] = {}
        for p, t in enumerate(row):
            if t not in by_id:
                continue
            route = by_id[t]
            absorber = next((r for r in TABLE.routes if route.token in r.absorbs and r.token in tokens), None)
            decoder = (absorber or route).decoder
            k = route.num_embs
            per_decoder.setdefault(decoder, []).append((t, p, absorber is not None, hidden[b, p + 1 : p + 1 + k]))
        for decoder, groups in per_decoder.items():
            out.setdefault(decoder, []).append((b, groups))
    return out


def test_gather_equals_naive_loop() -> None:
    torch.manual_seed(0)
    rng = random.Random(0)
    for _ in range(100):
        input_ids = random_batch(rng)
        hidden = torch.randn(*input_ids.shape, 6)
        got = gather_queries(hidden, input_ids, BOUND)
        expected = naive_gather(hidden, input_ids)
        assert set(got) == set(expected)
        for decoder, samples in expected.items():
            groups = got[decoder]
            k = TABLE.decoder_num_embs(decoder)
            g = max(len(gs) for _, gs in samples)
            assert groups.states.shape == (len(samples), g, k, 6)
            assert groups.batch_index.tolist() == [b for b, _ in samples]
            for row, (_, gs) in enumerate(samples):
                n = len(gs)
                assert groups.mask[row].tolist() == [True] * n + [False] * (g - n)
                assert groups.route_ids[row].tolist() == [t for t, *_ in gs] + [-1] * (g - n)
                assert groups.positions[row].tolist() == [p for _, p, *_ in gs] + [-1] * (g - n)
                assert groups.absorbed[row].tolist() == [a for _, _, a, _ in gs] + [False] * (g - n)
                assert torch.equal(groups.states[row, :n], torch.stack([s for *_, s in gs]))
                assert not groups.states[row, n:].any()


def test_pose_sample_sends_its_det_groups_to_keypoint() -> None:
    pose = [1, *group_ids("[DET]"), 2, *group_ids("[POSE]"), 3, *group_ids("[POSE]"), 4]
    det = [5, *group_ids("[DET]"), 6, *group_ids("[DET]"), 7] + [PAD] * 6
    input_ids = torch.tensor([det, pose, [8] * 19, det])
    hidden = torch.randn(*input_ids.shape, 4)
    groups = gather_queries(hidden, input_ids, BOUND)
    assert set(groups) == {"gdino", "keypoint"}
    assert groups["gdino"].batch_index.tolist() == [0, 3]
    assert groups["keypoint"].batch_index.tolist() == [1]
    assert groups["keypoint"].route_ids.tolist() == [[IDS["[DET]"], IDS["[POSE]"], IDS["[POSE]"]]]
    assert groups["keypoint"].absorbed.tolist() == [[True, False, False]]
    assert groups["keypoint"].positions.tolist() == [[1, 7, 13]]
    assert torch.equal(groups["keypoint"].states[0, 2], hidden[1, 14:18])
    without_keypoint = RouteTable.default().without_decoders(["keypoint"]).bind(IDS.__getitem__)
    with pytest.raises(ValueError, match="placeholder at position 8"):  # [POSE] is no longer a route token
        gather_queries(hidden, input_ids, without_keypoint)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_training_path_gradients_reach_query_tables_and_llm(attn: str) -> None:
    """Embed, splice, run the LLM, gather, and backpropagate a loss on the gathered states; overfit one batch."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD)
    config._attn_implementation = attn
    llm = LlamaForCausalLM(config)
    tables = torch.nn.ModuleDict({name: torch.nn.Embedding(k, 32) for name, k in TABLE.tables.items()})
    input_ids = torch.tensor([
        [PAD] * 70 + [1, *group_ids("[DET]"), 2, *group_ids("[POSE]"), 3],
        [4, *group_ids("[GEN]"), *range(5, 22)],
    ])
    attention_mask = (input_ids != PAD).long()
    targets = {"keypoint": torch.randn(1, 2, 4, 32), "sd": torch.randn(1, 1, 64, 32)}
    optimizer = torch.optim.Adam([*llm.parameters(), *tables.parameters()], lr=1e-2)
    losses = []
    for _ in range(15):
        embeds = llm.get_input_embeddings()(input_ids)  # [B, L, C]
        query_weight = torch.cat([tables[name].weight for name in TABLE.tables])  # [Q, C]
        embeds = splice_queries(embeds, input_ids, BOUND, query_weight, inplace=True)
        labels = input_ids.masked_fill(query_position_mask(input_ids, BOUND) | (attention_mask == 0), -100)
        out = llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, output_hidden_states=True)
        groups = gather_queries(out.hidden_states[-1], input_ids, BOUND)
        assert set(groups) == {"keypoint", "sd"} and groups["keypoint"].absorbed.tolist() == [[True, False]]
        loss = out.loss + sum(((groups[d].states - t) ** 2).mean() for d, t in targets.items())
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert tables["det"].weight.grad.abs().sum() > 0 and tables["pose"].weight.grad.abs().sum() > 0
            assert tables["gen"].weight.grad.abs().sum() > 0 and tables["edit"].weight.grad.abs().sum() == 0
            assert llm.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
            assert llm.get_input_embeddings().weight.grad[IDS["[EMB]"]].abs().sum() == 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
