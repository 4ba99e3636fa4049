"""Batched KV-cached decoding with routing equals per-sample decoding and the teacher-forced training forward."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from superlink import RouteTable, gather_queries, query_position_mask, splice_queries
from vllm2.generation import GenerationOutput, GrowingLayer, generate

TABLE = RouteTable.default()
IDS = {t: 80 + i for i, t in enumerate(TABLE.route_tokens + TABLE.placeholder_tokens)}
BOUND = TABLE.bind(IDS.__getitem__)
PAD, EOS = 0, 2
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18], [19, 20, 21], [22, 23, 24, 25, 26, 27, 28]]
# sample -> {step: forced token}; sample 1 never routes and ends early; sample 3 routes at its last step.
SCHEDULES = [
    {1: IDS["[DET]"], 3: IDS["[POSE]"]},
    {3: EOS},
    {0: IDS["[GEN]"], 4: IDS["[DET]"]},
    {5: IDS["[SEG]"]},
]
MAX_NEW = 6


class Forced:
    """A logits processor that forces the scheduled token of each sample at the scheduled step."""

    def __init__(self, schedules: list[dict[int, int]]) -> None:
        self.schedules = schedules

    def __call__(self, sampled: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = sampled.shape[1]
        scores = scores.clone()
        scores[:, [EOS, *IDS.values()]] = -1e4  # only the schedule emits special tokens
        for b, schedule in enumerate(self.schedules):
            if step in schedule:
                scores[b] = -1e4
                scores[b, schedule[step]] = 0.0
        return scores


def tiny_llm(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def left_padded(llm: LlamaForCausalLM, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (length - len(p)) + p for p in prompts])
    return llm.get_input_embeddings()(ids), (ids != PAD).long()


def run(llm: LlamaForCausalLM, prompts: list[list[int]], schedules: list[dict[int, int]], query_weight: torch.Tensor,
        **kwargs: object) -> GenerationOutput:
    embeds, mask = left_padded(llm, prompts)
    options = {"max_new_tokens": MAX_NEW, "eos_token_id": EOS, "logits_processor": Forced(schedules), **kwargs}
    return generate(llm, embeds, mask, BOUND, query_weight, llm.get_input_embeddings(), **options)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batched_routing_equals_per_sample_and_training_forward(attn: str) -> None:
    llm = tiny_llm(attn)
    query_weight = torch.randn(BOUND.total_queries, 32)
    batched = run(llm, PROMPTS, SCHEDULES, query_weight)
    assert batched.lengths.tolist() == [6 + 8, 4, 6 + 64 + 4, 6 + 4]
    groups = gather_queries(batched.hidden_states, batched.sequences, BOUND)
    assert {d: g.batch_index.tolist() for d, g in groups.items()} == {"keypoint": [0], "gdino": [2, 3], "sd": [2]}
    assert groups["keypoint"].absorbed.tolist() == [[True, False]]
    for b, (prompt, schedule) in enumerate(zip(PROMPTS, SCHEDULES)):
        single = run(llm, [prompt], [schedule], query_weight)
        n = int(single.lengths[0])
        assert int(batched.lengths[b]) == n
        assert batched.sequences[b, :n].tolist() == single.sequences[0, :n].tolist()
        assert (batched.sequences[b, n:] == PAD).all()
        torch.testing.assert_close(batched.hidden_states[b, :n], single.hidden_states[0, :n], atol=1e-5, rtol=0)
        for decoder, single_groups in gather_queries(single.hidden_states, single.sequences, BOUND).items():
            row = groups[decoder].batch_index.tolist().index(b)
            count = int(single_groups.mask.sum())
            torch.testing.assert_close(groups[decoder].states[row, :count], single_groups.states[0], atol=1e-5, rtol=0)
        # teacher forcing the generated ids reproduces the captured states (the training path sees the same states)
        ids = torch.tensor([prompt + single.sequences[0, :n].tolist()])
        embeds = splice_queries(llm.get_input_embeddings()(ids), ids, BOUND, query_weight)
        with torch.no_grad():
            hidden = llm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1][0, len(prompt):]
        fed = single.hidden_states[0, :n].abs().sum(-1) > 0  # [n]
        ends_with_queries = bool(BOUND.is_placeholder(single.sequences[0, n - 1]))
        assert fed[:-1].all() and bool(fed[-1]) == ends_with_queries  # a final plain token is not fed
        torch.testing.assert_close(hidden[fed], single.hidden_states[0, :n][fed], atol=1e-5, rtol=0)


def test_growing_layer_equals_concatenation_and_writes_in_place() -> None:
    """Keys and values read back as the concatenation of every update, rows selected as indexing selects them; updates
    within the spare room keep the buffer (written in place), one past it moves to a larger buffer."""
    torch.manual_seed(0)
    layer, keys, values, buffers = GrowingLayer(), [], [], []
    for n in [5, 1, 1, 9, 1, 64, 1]:  # room for 5 + 64 positions after the first update; the 64 goes past it
        keys.append(torch.randn(3, 2, n, 4))
        values.append(torch.randn(3, 2, n, 4))
        got_keys, got_values = layer.update(keys[-1], values[-1])
        assert torch.equal(got_keys, torch.cat(keys, 2)) and torch.equal(got_values, torch.cat(values, 2))
        buffers.append(layer.buffers[0].data_ptr())
    assert buffers[:5] == [buffers[0]] * 5 and buffers[5:] == [buffers[5]] * 2 and buffers[5] != buffers[0]
    layer.batch_select_indices(torch.tensor([2, 0]))
    new_keys, new_values = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    got_keys, got_values = layer.update(new_keys, new_values)
    assert torch.equal(got_keys, torch.cat([torch.cat(keys, 2)[[2, 0]], new_keys], 2))
    assert torch.equal(got_values, torch.cat([torch.cat(values, 2)[[2, 0]], new_values], 2))
    assert layer.get_seq_length() == 83


def ours_and_transformers(llm) -> tuple[GenerationOutput, object]:
    """Greedy decoding of PROMPTS without routes, by :func:`generate` and by ``llm.generate`` (with hidden states)."""
    embeds, mask = left_padded(llm, PROMPTS)
    no_special = Forced([{}] * len(PROMPTS))
    ours = generate(llm, embeds, mask, BOUND, torch.zeros(BOUND.total_queries, 32), llm.get_input_embeddings(),
                    max_new_tokens=MAX_NEW, logits_processor=no_special)
    with torch.no_grad():
        reference = llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                                 logits_processor=LogitsProcessorList([no_special]), eos_token_id=None,
                                 pad_token_id=PAD, output_hidden_states=True, return_dict_in_generate=True)
    return ours, reference


def test_without_routes_matches_transformers_generate() -> None:
    ours, reference = ours_and_transformers(tiny_llm("sdpa"))
    assert ours.sequences.tolist() == reference.sequences[:, -MAX_NEW:].tolist()
    assert ours.lengths.tolist() == [MAX_NEW] * len(PROMPTS)


def test_sliding_window_layers_keep_their_window() -> None:
    """A model whose layers attend within a window (Mistral's ``sliding_window``) decodes as transformers does, hidden
    states included: a decode step gets no prepared full-attention mask that would drop the window."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4, pad_token_id=PAD,
                           attn_implementation="sdpa")
    ours, reference = ours_and_transformers(MistralForCausalLM(config).eval())
    assert ours.sequences.tolist() == reference.sequences[:, -MAX_NEW:].tolist()
    fed = torch.cat([step[-1][:, -1:] for step in reference.hidden_states[1:]], 1)  # [B, MAX_NEW - 1, C]
    torch.testing.assert_close(ours.hidden_states[:, : MAX_NEW - 1], fed, atol=1e-5, rtol=0)


def test_route_at_the_only_step_is_fed_and_captured() -> None:
    llm = tiny_llm("eager")
    query_weight = torch.randn(BOUND.total_queries, 32)
    out = run(llm, PROMPTS[:2], [{0: IDS["[EDIT]"]}, {}], query_weight, max_new_tokens=1)
    assert out.lengths.tolist() == [65, 1]
    assert out.sequences[0].tolist() == [IDS["[EDIT]"]] + [IDS["[EMB]"]] * 64
    assert out.hidden_states[0].abs().sum(-1).gt(0).all() and not out.hidden_states[1].any()
    groups = gather_queries(out.hidden_states, out.sequences, BOUND)
    assert list(groups) == ["ip2p"] and groups["ip2p"].states.shape == (1, 1, 64, 32)


def test_sampling_and_stop_strings() -> None:
    llm = tiny_llm("sdpa")
    query_weight = torch.randn(BOUND.total_queries, 32)
    greedy = run(llm, PROMPTS, SCHEDULES, query_weight)
    nucleus = run(llm, PROMPTS, SCHEDULES, query_weight, do_sample=True, temperature=0.7, top_p=1e-6,
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(nucleus.sequences, greedy.sequences)  # top-p this small keeps only the best token
    sampled = run(llm, PROMPTS, [{}] * 4, query_weight, do_sample=True, temperature=5.0,
                  generator=torch.Generator().manual_seed(0))
    assert sampled.sequences.shape[0] == 4 and (sampled.lengths == MAX_NEW).all()
    stop_at = {0: {2: 42}, 1: {1: 42}}
    stopped = run(llm, PROMPTS[:2], [stop_at[0], stop_at[1]], query_weight, stop_strings=["*"],
                  decode=lambda ids: "".join("*" if i == 42 else "a" for i in ids))
    assert stopped.lengths.tolist() == [3, 2]
    assert stopped.sequences[0, 2] == 42 and stopped.sequences[1].tolist() == [stopped.sequences[1, 0].item(), 42, PAD]


def test_chat_only_table_feeds_no_queries() -> None:
    llm = tiny_llm("sdpa")
    chat_only = TABLE.without_decoders(TABLE.decoders).bind(IDS.__getitem__)
    embeds, mask = left_padded(llm, PROMPTS[:2])
    out = generate(llm, embeds, mask, chat_only, torch.zeros(0, 32), llm.get_input_embeddings(),
                   max_new_tokens=MAX_NEW, logits_processor=Forced([{1: IDS["[DET]"]}, {}]))
    assert out.lengths.tolist() == [MAX_NEW, MAX_NEW] and out.sequences[0, 1] == IDS["[DET]"]
    assert gather_queries(out.hidden_states, out.sequences, chat_only) == {}


def test_bad_prompts_raise() -> None:
    llm = tiny_llm("eager")
    embeds, mask = left_padded(llm, PROMPTS)
    weight = torch.zeros(BOUND.total_queries, 32)
    with pytest.raises(ValueError, match="left-padded"):
        generate(llm, embeds, mask.flip(1), BOUND, weight, llm.get_input_embeddings(), max_new_tokens=2)
    with pytest.raises(ValueError, match="stop_strings need a decode"):
        generate(llm, embeds, mask, BOUND, weight, llm.get_input_embeddings(), max_new_tokens=2, stop_strings=["x"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(llm, embeds, mask, BOUND, weight, llm.get_input_embeddings(), max_new_tokens=0)


def test_placeholders_are_never_sampled() -> None:
    """Even when the scores prefer a placeholder id, generation never writes one outside a spliced group."""
    llm = tiny_llm("eager")
    placeholder = int(BOUND.placeholder_ids[0])

    def prefer_placeholder(sampled: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        boosted = scores.clone()
        boosted[:, placeholder] = boosted.max() + 100.0
        return boosted

    embeds, mask = left_padded(llm, PROMPTS)
    out = generate(llm, embeds, mask, BOUND, torch.zeros(BOUND.total_queries, 32), llm.get_input_embeddings(),
                   max_new_tokens=MAX_NEW, logits_processor=prefer_placeholder)
    is_placeholder = BOUND.is_placeholder(out.sequences)  # [B, T]
    assert torch.equal(is_placeholder, query_position_mask(out.sequences, BOUND))  # only inside spliced groups
