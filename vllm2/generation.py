"""Batched KV-cached generation with super-link routing, over any Hugging Face causal LM.

When a sample emits a route token, its K query embeddings are fed right after the token in the next step, while the
other samples feed one token and masked holes (see :mod:`superlink.decoding`). The generated ids keep the placeholder
ids at the query positions and the last-layer hidden states of every fed position are captured, so
``superlink.gather_queries(out.hidden_states, out.sequences, bound)`` yields the query groups for the decoders.
A finished sample leaves the batch (its cache rows are dropped), so the remaining steps of a batch that mixes short
and long answers cost what its unfinished samples cost; logits processors still see the whole batch. Full-attention
layers keep their keys and values in buffers with spare room, written in place (:class:`GrowingLayer`), so a decode
step copies its new positions only instead of the whole cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from superlink.decoding import build_step, compact_steps, prompt_position_ids
from superlink.routes import BoundRoutes

__all__ = ["GenerationOutput", "GrowingLayer", "generate", "new_cache"]

logger = logging.getLogger(__name__)

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GenerationOutput:
    """Generated positions of each sample (T = the longest), right-padded.

    Attributes:
        sequences: ``[B, T]`` new ids: sampled tokens, with the placeholder ids at query positions.
        hidden_states: ``[B, T, C]`` last-layer hidden state of each position (zeros for a final token that was not
            fed, e.g. the end-of-sequence token, and after the end).
        lengths: ``[B]`` number of positions of each sample.
    """

    sequences: torch.Tensor
    hidden_states: torch.Tensor
    lengths: torch.Tensor


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in buffers ``[b, H, capacity, D]`` with spare room: ``update``
    writes the new positions in place and returns views of the filled part, and a full buffer grows by half (or
    ``MIN_GROWTH`` positions), so a decode step costs its new positions, not a copy of the whole cache as
    ``DynamicLayer``'s concatenation does (a fifth of a batched decode step on a CPU). ``keys`` and ``values`` are
    always those views, so the rest of the ``Cache`` API reads them as usual."""

    MIN_GROWTH = 64

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[b, H, n, D]`` new keys and values; returns all of them ``[b, H, S + n, D]``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if start == 0 or end > self.buffers[0].shape[-2]:
            self._grow(key_states, value_states, start, end)
        for buffer, new in zip(self.buffers, (key_states, value_states)):
            buffer[..., start:end, :] = new
        self.keys, self.values = (buffer[..., :end, :] for buffer in self.buffers)
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, start: int, end: int) -> None:
        """New buffers with room for ``end`` positions and spare, holding the ``start`` cached ones."""
        capacity = end + max(end // 2, self.MIN_GROWTH)
        buffers = tuple(new.new_empty((*new.shape[:-2], capacity, new.shape[-1])) for new in (key_states, value_states))
        if start:
            for buffer, old in zip(buffers, (self.keys, self.values)):
                buffer[..., :start, :] = old
        self.buffers = buffers

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` of the cache."""
        if self.get_seq_length() > 0:
            end = self.keys.shape[-2]
            self.buffers = tuple(buffer[indices] for buffer in self.buffers)
            self.keys, self.values = (buffer[..., :end, :] for buffer in self.buffers)


def new_cache(config) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers grow in place (:class:`GrowingLayer`); other
    layer kinds (sliding windows, linear attention) stay as transformers builds them."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _check_prompt(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                  max_new_tokens: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's bool mask ``[B, L]`` and the sampled-token budget of each sample ``[B]``."""
    if inputs_embeds.dim() != 3 or attention_mask.shape != inputs_embeds.shape[:2]:
        raise ValueError(
            f"inputs_embeds must be [B, L, C] and attention_mask [B, L]; got {tuple(inputs_embeds.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    budget = torch.as_tensor(max_new_tokens, dtype=torch.long, device=inputs_embeds.device)
    if budget.dim() > 1 or (budget.dim() == 1 and len(budget) != inputs_embeds.shape[0]):
        raise ValueError(f"max_new_tokens must be one int or one per sample ({inputs_embeds.shape[0]}), "
                         f"got {max_new_tokens}")
    if bool((budget < 1).any()):
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    mask = attention_mask.bool()  # [B, L]
    if not bool(mask[:, -1].all()) or bool((mask.long().diff(dim=1) < 0).any()):
        raise ValueError("attention_mask must describe a left-padded prompt (padding first, then real tokens)")
    return mask, budget.expand(inputs_embeds.shape[0])


def _next_tokens(
    history: torch.Tensor,
    logits: torch.Tensor,
    blocked: torch.Tensor,
    logits_processor: LogitsProcessor | None,
    warpers: LogitsProcessorList | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Greedy or sampled next token ``[B]`` from logits ``[B, V]`` given the tokens sampled so far ``[B, t]``.
    Placeholder ids are never chosen: only the splice writes them."""
    scores = logits if logits_processor is None else logits_processor(history, logits)  # [B, V]
    scores = scores.index_fill(1, blocked, float("-inf"))  # [B, V]
    if warpers is None:
        return scores.argmax(-1)
    probs = torch.softmax(warpers(history, scores), dim=-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, batch: int, fill: float | int | bool) -> torch.Tensor:
    """``values`` of the decoding rows ``[b, ...]`` placed at their batch indices ``rows`` of a ``[batch, ...]``
    tensor filled with ``fill``."""
    if len(rows) == batch:
        return values
    return values.new_full((batch, *values.shape[1:]), fill).index_copy(0, rows, values)


def _stop_string_hits(
    generated: list[list[int]], active: torch.Tensor, stop_strings: Sequence[str], decode: Callable[[list[int]], str]
) -> torch.Tensor:
    """``[B]`` bool: active samples whose decoded text contains a stop string."""
    hits = [bool(a) and any(s in decode(ids) for s in stop_strings) for a, ids in zip(active.tolist(), generated)]
    return torch.tensor(hits, dtype=torch.bool, device=active.device)


@torch.no_grad()
def generate(
    llm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    bound: BoundRoutes,
    query_weight: torch.Tensor,
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    *,
    max_new_tokens: int | Sequence[int],
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    logits_processor: LogitsProcessor | None = None,
    stop_strings: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Generate from a left-padded batch of prompt embeddings, splicing query embeddings after route tokens.

    Args:
        llm: a Hugging Face causal LM (called with ``inputs_embeds``, ``attention_mask``, ``position_ids``, ``cache``).
        inputs_embeds: ``[B, L, C]`` prompt embeddings, left-padded.
        attention_mask: ``[B, L]`` 1 at real prompt positions.
        bound: the bound route table.
        query_weight: ``[Q, C]`` concatenated query tables (``RouteTable.tables`` order).
        embed_tokens: ids ``[B]`` -> embeddings ``[B, C]`` (the LLM's input embedding).
        max_new_tokens: maximum number of sampled tokens (query positions not counted): one for every sample, or one
            per sample.
        eos_token_id: id(s) that end a sample (kept in ``sequences``).
        pad_token_id: id written after a sample's end.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature (with ``do_sample``).
        top_p: nucleus sampling threshold (with ``do_sample``).
        logits_processor: ``(sampled_ids [B, t], scores [B, V]) -> scores`` applied before choosing, e.g. a
            ``transformers.LogitsProcessorList``.
        stop_strings: a sample ends once its decoded text contains one of these.
        decode: ids -> text, required with ``stop_strings``.
        generator: random generator for sampling.
    Returns:
        The generated ids and the captured hidden states.
    """
    mask, budget = _check_prompt(inputs_embeds, attention_mask, max_new_tokens)  # [B, L], [B]
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a decode callable")
    device = inputs_embeds.device
    bound = bound.to(device)
    stop_ids = _stop_ids(eos_token_id, device)  # [E]
    warpers = _warpers(temperature, top_p) if do_sample else None
    state = _prefill(llm, inputs_embeds, mask)
    while state.rows.numel():
        tokens, done = _choose(state, bound, logits_processor, warpers, generator, pad_token_id, stop_ids, budget,
                               stop_strings, decode)  # [B], [B]
        _feed(state, llm, tokens, done, bound, query_weight, embed_tokens, inputs_embeds.dtype, pad_token_id)
    sequences, hidden_states, lengths = compact_steps(
        torch.cat(state.steps_ids, 1), torch.cat(state.steps_hidden, 1), torch.cat(state.steps_valid, 1), pad_token_id
    )
    logger.debug("generated %s positions in %d steps", lengths.tolist(), len(state.history))
    return GenerationOutput(sequences=sequences, hidden_states=hidden_states, lengths=lengths)


def _stop_ids(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor:
    """The end-of-sequence ids as a ``[E]`` long tensor (empty without any)."""
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(eos, dtype=torch.long, device=device)


def _warpers(temperature: float, top_p: float) -> LogitsProcessorList:
    """The sampling warpers: temperature, then nucleus filtering when ``top_p < 1``."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


@dataclass
class _DecodeState:
    """What the decode loop carries between steps. Rows are the samples still decoding (``b <= B``); finished rows
    leave the batch and the cache, and per-step records are scattered back to all ``B`` samples."""

    cache: DynamicCache
    four_d: bool  # decode steps get a prepared 4D mask (see _takes_4d_mask)
    mask: torch.Tensor  # [b, S] attention mask of the cached positions
    logits: torch.Tensor  # [b, V] next-token logits of each decoding row
    next_position: torch.Tensor  # [b] position id of each row's next real position
    rows: torch.Tensor  # [b] the batch index of each decoding row
    active: torch.Tensor  # [B] bool: not finished
    history: list[torch.Tensor]  # per step, the sampled tokens [B]
    generated: list[list[int]]  # per sample, its sampled ids (kept only for stop strings)
    steps_ids: list[torch.Tensor]  # per step, [B, W] ids
    steps_hidden: list[torch.Tensor]  # per step, [B, W, C] captured hidden states
    steps_valid: list[torch.Tensor]  # per step, [B, W] bool: real positions


def _takes_4d_mask(config) -> bool:
    """Whether decode steps may hand the LLM a prepared 4D mask: eager or sdpa attention and no sliding-window layers
    (a given 4D mask applies to every layer as it is, so their windows would be lost)."""
    sliding = getattr(config, "sliding_window", None) or "sliding_attention" in (getattr(config, "layer_types", None)
                                                                                 or ())
    return config._attn_implementation in ("eager", "sdpa") and not sliding


def _step_mask(mask: torch.Tensor, width: int, dtype: torch.dtype, four_d: bool) -> torch.Tensor:
    """The attention mask of a decoding step: with ``four_d``, the additive ``[b, 1, W, S]`` mask in which each of the
    step's ``W`` new positions sees the cache's real positions up to itself (given prepared, the LLM skips its own mask
    building: a tenth of a batched decode step); otherwise the 2D ``mask`` ``[b, S]``."""
    if not four_d:
        return mask.long()
    total = mask.shape[1]
    keys = torch.arange(total, device=mask.device)  # [S]
    causal = keys[None] <= torch.arange(total - width, total, device=mask.device)[:, None]  # [W, S]
    allowed = mask[:, None, :] & causal[None]  # [b, W, S]
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)[:, None]  # [b, 1, W, S]


def _prefill(llm: nn.Module, inputs_embeds: torch.Tensor, mask: torch.Tensor) -> _DecodeState:
    """Run the prompt through the LLM into a fresh cache and start the decode state."""
    batch, device = inputs_embeds.shape[0], inputs_embeds.device
    cache = new_cache(llm.config)
    out = llm(
        inputs_embeds=inputs_embeds,
        attention_mask=mask.long(),
        position_ids=prompt_position_ids(mask),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return _DecodeState(
        cache=cache,
        four_d=_takes_4d_mask(llm.config),
        mask=mask,
        logits=out.logits[:, -1].float(),  # [B, V]
        next_position=mask.sum(1),  # [B]
        rows=torch.arange(batch, device=device),  # [B]
        active=torch.ones(batch, dtype=torch.bool, device=device),  # [B]
        history=[],
        generated=[[] for _ in range(batch)],
        steps_ids=[],
        steps_hidden=[],
        steps_valid=[],
    )


def _choose(
    state: _DecodeState,
    bound: BoundRoutes,
    logits_processor: LogitsProcessor | None,
    warpers: LogitsProcessorList | None,
    generator: torch.Generator | None,
    pad_token_id: int,
    stop_ids: torch.Tensor,
    budget: torch.Tensor,
    stop_strings: Sequence[str],
    decode: Callable[[list[int]], str] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose every sample's next token and find the samples that end with it.

    Returns:
        ``tokens [B]`` (``pad_token_id`` for finished samples) and ``done [B]`` (active samples ending now).
    """
    batch, active = state.active.shape[0], state.active
    history = state.history
    sampled = torch.stack(history, 1) if history else torch.zeros(batch, 0, dtype=torch.long, device=active.device)
    scores = _scatter_rows(state.logits, state.rows, batch, 0.0)  # [B, V]: processors see the whole batch
    tokens = _next_tokens(sampled, scores, bound.placeholder_ids, logits_processor, warpers, generator)  # [B]
    tokens = torch.where(active, tokens, pad_token_id)  # [B]
    history.append(tokens)
    done = active & torch.isin(tokens, stop_ids)  # [B]
    if stop_strings:
        for ids, token, is_active in zip(state.generated, tokens.tolist(), active.tolist()):
            if is_active:
                ids.append(token)
        done |= _stop_string_hits(state.generated, active, stop_strings, decode)
    done |= active & (budget <= len(history))
    return tokens, done


def _feed(
    state: _DecodeState,
    llm: nn.Module,
    tokens: torch.Tensor,
    done: torch.Tensor,
    bound: BoundRoutes,
    query_weight: torch.Tensor,
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    dtype: torch.dtype,
    pad_token_id: int,
) -> None:
    """Feed the chosen tokens (and a route token's queries) through the LLM, record the step, drop finished rows."""
    rows, batch = state.rows, state.active.shape[0]
    own = tokens[rows]  # [b]
    feed = ~done[rows] | (bound.route_index(own) >= 0)  # [b]: route tokens always get their queries
    step = build_step(own, feed, embed_tokens(own), state.next_position, bound, query_weight, pad_token_id)
    hidden = step.embeds.new_zeros(step.embeds.shape, dtype=dtype)  # [b, W, C]
    if bool(feed.any()):
        state.mask = torch.cat([state.mask, step.mask], dim=1)  # [b, S]
        out = llm(
            inputs_embeds=step.embeds.to(dtype),
            attention_mask=_step_mask(state.mask, step.mask.shape[1], dtype, state.four_d),
            position_ids=step.position_ids,
            cache=state.cache,
            use_cache=True,
            output_hidden_states=True,
        )
        hidden = torch.where(step.mask[..., None], out.hidden_states[-1], hidden)  # [b, W, C]
        state.logits = out.logits[torch.arange(len(rows), device=rows.device), step.last_index].float()  # [b, V]
        state.next_position = state.next_position + step.num_real
    valid = step.mask.clone()  # [b, W]
    valid[:, 0] = True  # the sampled token, fed or not (an end-of-sequence token is not)
    ids = step.ids.clone()  # [b, W]
    ids[:, 0] = own
    state.steps_ids.append(_scatter_rows(ids, rows, batch, pad_token_id))
    state.steps_hidden.append(_scatter_rows(hidden, rows, batch, 0.0))
    state.steps_valid.append(_scatter_rows(valid, rows, batch, False))
    state.active = state.active & ~done
    keep = state.active[rows]  # [b]
    if not bool(keep.all()):  # finished rows leave the batch and the cache
        state.rows, state.mask = rows[keep], state.mask[keep]
        state.logits, state.next_position = state.logits[keep], state.next_position[keep]
        state.cache.batch_select_indices(keep.nonzero()[:, 0])
