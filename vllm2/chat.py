"""Batched chat: generate with routes, then run each decoder on the query states the model produced itself.

With text transmission (``processor.text_link``), detection, grounding and keypoint answers are read back from the
generated location and class tokens instead (see :mod:`superlink.text`): tagged boxes stand for the detection route,
an untagged box for the grounding route, tagged boxes with points for the pose route. Their outputs carry the
decoder name of that route (no decoder runs) with scores 1, and the names the prompt bound to the class tokens as
phrases; malformed elements are skipped and counted in ``ChatResult.malformed``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from PIL import Image

from superlink import CLASS_TOKEN, ParsedText, QueryGroups, RouteTable, TextBox, TextLink, gather_queries

from .device import to_device
from .generation import generate
from .processor import Sample

if TYPE_CHECKING:
    from .modeling import VisionLLMv2Model
    from .processor import VisionLLMv2Processor

logger = logging.getLogger(__name__)

__all__ = ["ChatResult", "RouteOutput", "chat", "declared_classes", "history_text", "route_phrases", "text_outputs"]

_ARTICLE = re.compile(r"^(the|a|an)\s+", re.IGNORECASE)
_PHRASE_SPLIT = re.compile(r",|;|\.|:|\band\b|\bfor\b|\bof\b|\bare\b|\bis\b|\bthe results\b", re.IGNORECASE)


@dataclass
class RouteOutput:
    """One emitted route and what its decoder made of it.

    Attributes:
        route: the route token, e.g. ``"[DET]"``.
        decoder: the decoder name it routes to.
        phrases: the phrase the model wrote before each group of this output (category names, keypoint names).
        result: boxes/labels/scores/masks, keypoints, or a PIL image (decoder specific); None on error.
        error: a readable message when the decoder is missing or failed.
        unconfigured: the route's decoder is not configured in the model (``error`` says so).
    """

    route: str
    decoder: str
    phrases: list[str] = field(default_factory=list)
    result: Any = None
    error: str | None = None
    unconfigured: bool = False


@dataclass
class ChatResult:
    """The answer to one prompt.

    Attributes:
        text: the answer (placeholders removed).
        outputs: one per decoder call (and per text-transmitted structure).
        routes: the route of every query group, in text order: the route tokens written, or for text transmission
            the routes its structures stand for.
        num_tokens: positions the LLM decoded for this answer (query positions included).
        malformed: text-transmission elements that could not be read and were skipped.
        prompt_tokens: positions of the prompt (conversation, images expanded to their patch tokens).
        finish_reason: ``"stop"`` (end of sequence or a stop string) or ``"length"`` (the token budget ran out).
    """

    text: str
    outputs: list[RouteOutput] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)
    num_tokens: int = 0
    malformed: int = 0
    prompt_tokens: int = 0
    finish_reason: str = "stop"


def history_text(text: str, routes: RouteTable) -> str:
    """An answer as an earlier turn for the model: each route token followed again by its query placeholders."""
    pattern = "|".join(re.escape(t) for t in routes.route_tokens)
    return re.sub(pattern, lambda m: routes.answer_suffix(m[0]), text) if pattern else text


def route_phrases(text_before: Sequence[str]) -> list[str]:
    """The phrase each route refers to, from the text written before each route token.

    ``<det>phrase</det>`` spans win; otherwise the words after the last separator (comma, "and", "for", ...),
    without a leading article.
    """
    phrases = []
    for before in text_before:
        tagged = re.findall(r"<det>(.*?)</det>\s*$", before)
        phrase = tagged[0] if tagged else _ARTICLE.sub("", _PHRASE_SPLIT.split(before)[-1].strip())
        phrases.append(phrase.strip(" \n'\""))
    return phrases


def _text_pieces(processor: VisionLLMv2Processor, ids: list[int]) -> tuple[str, list[str], list[str]]:
    """Decode generated ids to display text, the text before each route token (since the previous one) and the
    route tokens."""
    tok, bound = processor.tokenizer, processor.bound
    route_ids = set(bound.route_ids.tolist())
    drop = set(bound.placeholder_ids.tolist()) | {tok.eos_token_id, tok.pad_token_id}
    text, before, routes, chunk = "", [], [], []
    for token in ids:
        if token in route_ids:
            piece = tok.decode(chunk, skip_special_tokens=False)
            before.append(piece)
            routes.append(tok.convert_ids_to_tokens(token))
            text += piece + routes[-1]
            chunk = []
        elif token not in drop:
            chunk.append(token)
    text += tok.decode(chunk, skip_special_tokens=False)
    return text.strip(), before, routes


def declared_classes(prompt: str) -> dict[int, str]:
    """The names a prompt binds to class tokens (``Classes: circle<c0>, square<c1>.`` -> ``{0: "circle", ...}``)."""
    parts = CLASS_TOKEN.split(prompt)  # text, k, text, k, ..., text
    return dict(zip((int(k) for k in parts[1::2]), route_phrases(parts[0:-1:2])))


def text_outputs(parsed: ParsedText, declared: dict[int, str], link: TextLink,
                 routes: RouteTable) -> tuple[list[RouteOutput], list[str]]:
    """The outputs a text-transmission answer stands for, and the route of each of their groups.

    Args:
        parsed: the answer's elements.
        declared: class index -> the name the prompt bound to it.
        link: the location and class vocabulary (names undeclared classes).
        routes: the route table (routes and decoders of det, rec and pose).
    Returns:
        Pose (tagged boxes with points: object groups on the det route, keypoint groups on the pose route) or
        detection (tagged boxes, one group per class), then grounding (untagged boxes, one group).
    """
    det, grd, pose = (routes.route_for_task(t) for t in ("det", "rec", "pose"))
    tagged = [b for b in parsed.boxes if b.label is not None]
    untagged = [b for b in parsed.boxes if b.label is None]
    outputs, group_routes = [], []

    def add(route: str, classes: list[int], result: dict[str, torch.Tensor], kinds: list[str]) -> None:
        phrases = [declared.get(k, link.cls(k)) for k in classes]
        outputs.append(RouteOutput(route, routes.route(route).decoder, phrases, result))
        group_routes.extend(kinds)

    if any(b.points for b in tagged):
        objects = sorted({b.label for b in tagged})
        parts = sorted((set(declared) | {k for b in tagged for k in b.points}) - set(objects))
        keypoints = torch.zeros(len(tagged), len(parts), 3)  # [n, Kp, 3]; unwritten keypoints stay (0, 0, 0)
        for i, b in enumerate(tagged):
            for k, (x, y) in b.points.items():
                if k in parts:
                    keypoints[i, parts.index(k)] = torch.tensor([x, y, 1.0])
        result = _boxes(tagged, [objects.index(b.label) for b in tagged])
        add(pose, objects + parts, {**result, "keypoints": keypoints}, [det] * len(objects) + [pose] * len(parts))
    elif tagged:
        classes = list(range(max([b.label for b in tagged] + list(declared)) + 1))
        add(det, classes, _boxes(tagged, [b.label for b in tagged]), [det] * len(classes))
    if untagged:
        add(grd, [0], _boxes(untagged, [0] * len(untagged)), [grd])
    return outputs, group_routes


def _boxes(boxes: list[TextBox], labels: list[int]) -> dict[str, torch.Tensor]:
    """A decoder-style result of parsed boxes (every score 1: text carries no confidence)."""
    return {"boxes": torch.tensor([b.box for b in boxes], dtype=torch.float32).reshape(-1, 4),  # [n, 4]
            "scores": torch.ones(len(boxes)), "labels": torch.tensor(labels, dtype=torch.long)}


@torch.no_grad()
def chat(
    model: VisionLLMv2Model,
    processor: VisionLLMv2Processor,
    images: Sequence[Image.Image | str | None | Sequence[Image.Image | str]],
    prompts: Sequence[str],
    regions: Sequence[Sequence[np.ndarray]] | None = None,
    history: Sequence[Sequence[tuple[str, str]]] | None = None,
    max_new_tokens: int | Sequence[int] = 128,
    stop_strings: Sequence[str] = (),
    decoder_options: dict[str, dict[str, Any]] | None = None,
    raise_decoder_errors: bool = False,
    **gen_kwargs: Any,
) -> list[ChatResult]:
    """Answer a batch of prompts; run the decoders the model routes to.

    Args:
        model: the model (its decoders run on the captured query states).
        processor: the matching processor.
        images: per prompt an image, a list of images, or None. A prompt without ``<image>`` gets one
            ``<image>\\n`` prefix per image.
        prompts: the user messages.
        regions: per prompt, bool masks ``[H, W]`` on its first image (one per ``<region>`` token).
        history: per prompt, earlier ``(role, text)`` turns.
        max_new_tokens: sampled-token budget of every prompt, or one per prompt.
        stop_strings: stop a sample once its text contains one of these.
        decoder_options: decoder name -> keyword options for its ``predict``.
        raise_decoder_errors: raise a decoder's exception (and ``ValueError`` for a route to a decoder that is not
            configured) instead of recording it in :attr:`RouteOutput.error`.
        gen_kwargs: ``do_sample``, ``temperature``, ``top_p``, ``logits_processor``, ``generator``.
    Returns:
        One :class:`ChatResult` per prompt.
    """
    samples, pil_images = _build_samples(processor, images, prompts, regions, history)
    device = next(model.parameters()).device
    batch = processor(samples, generation=True).to(device)
    embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["region_masks"], batch["region_tiles"])
    tok = processor.tokenizer
    out = generate(
        model.llm, embeds, batch["attention_mask"], model.bound, model.query_weight.to(embeds.dtype),
        model.llm.get_input_embeddings(), max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, stop_strings=stop_strings, decode=tok.decode, **gen_kwargs,
    )
    pieces = [_text_pieces(processor, seq[:n].tolist()) for seq, n in zip(out.sequences, out.lengths)]
    prompt_tokens = batch["attention_mask"].sum(1).tolist()
    finish = _finish_reasons(out, model.bound.placeholder_ids, max_new_tokens, tok.eos_token_id)
    results = [ChatResult(text, routes=routes, num_tokens=int(n), prompt_tokens=int(p), finish_reason=f)
               for (text, _, routes), n, p, f in zip(pieces, out.lengths, prompt_tokens, finish)]
    phrases = [route_phrases(before) for _, before, _ in pieces]
    if processor.text_link is not None:
        _read_text(processor, out, pil_images, prompts, results)
    rank = (model.bound.route_index(out.sequences) >= 0).long().cumsum(1) - 1  # [B, T] index among a sample's routes
    for name, groups in gather_queries(out.hidden_states, out.sequences, model.bound).items():
        group_phrases = [[phrases[b][int(rank[b, p])] for p, ok in zip(groups.positions[row], groups.mask[row]) if ok]
                         for row, b in enumerate(groups.batch_index.tolist())]
        _run_decoder(model, name, groups, pil_images, group_phrases, results, (decoder_options or {}).get(name, {}),
                     raise_decoder_errors)
    return results


def _finish_reasons(out: Any, placeholder_ids: torch.Tensor, max_new_tokens: int | Sequence[int],
                    eos_token_id: int | None) -> list[str]:
    """Per answer ``"length"`` when it wrote its whole token budget without ending, else ``"stop"``."""
    positions = torch.arange(out.sequences.shape[1], device=out.sequences.device)  # [T]
    real = positions[None] < out.lengths[:, None]  # [B, T]
    sampled = (real & ~torch.isin(out.sequences, placeholder_ids.to(out.sequences.device))).sum(1)  # [B]
    budget = torch.as_tensor(max_new_tokens, device=sampled.device).expand_as(sampled)  # [B]
    last = out.sequences.gather(1, (out.lengths - 1).clamp(min=0)[:, None])[:, 0]  # [B]
    ended = last == eos_token_id if eos_token_id is not None else torch.zeros_like(sampled, dtype=torch.bool)
    return ["length" if full and not end else "stop" for full, end in zip((sampled >= budget).tolist(),
                                                                         ended.tolist())]


def _read_text(processor: VisionLLMv2Processor, out: Any, images: list[list[Image.Image]], prompts: Sequence[str],
               results: list[ChatResult]) -> None:
    """Attach the outputs of each answer's text-transmitted structures (answers about an image only)."""
    for b, (seq, n) in enumerate(zip(out.sequences, out.lengths)):
        if not images[b]:
            continue
        width, height = images[b][0].size
        parsed = processor.text_link.parse(processor.tokenizer.convert_ids_to_tokens(seq[:n].tolist()), width, height)
        outputs, group_routes = text_outputs(parsed, declared_classes(prompts[b]), processor.text_link,
                                             processor.routes)
        results[b].outputs += outputs
        results[b].routes += group_routes
        results[b].malformed = parsed.malformed
        if parsed.malformed:
            logger.warning("answer %d: %d malformed location elements skipped", b, parsed.malformed)


def _build_samples(processor, images, prompts, regions, history) -> tuple[list[Sample], list[list[Image.Image]]]:
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image entries (use None for no image)")
    samples, pil_images = [], []
    for i, prompt in enumerate(prompts):
        entry = images[i]
        ims = [] if entry is None else [entry] if isinstance(entry, (Image.Image, str)) else list(entry)
        ims = [processor._load(im) for im in ims]
        turns = list(history[i]) if history else []
        mentioned = "<image>" in prompt or any("<image>" in text for _, text in turns)
        text = prompt if mentioned or not ims else "<image>\n" * len(ims) + prompt
        region_list = [(m, 0) for m in (regions[i] if regions else [])]
        samples.append(Sample(turns + [("user", text)], ims, region_list))
        pil_images.append(ims)
    return samples, pil_images


def _run_decoder(model, name: str, groups: QueryGroups, images, phrases, results, options: dict,
                 raise_errors: bool = False) -> None:
    """Run one decoder on its groups; attach one :class:`RouteOutput` per sample (errors become messages, or are
    raised with ``raise_errors``)."""
    id_to_token = dict(zip(model.bound.route_ids.tolist(), model.routes.route_tokens))
    index = groups.batch_index.tolist()
    outputs = []
    for row, b in enumerate(index):
        own = groups.route_ids[row][groups.mask[row] & ~groups.absorbed[row]]  # the routes that chose this decoder
        outputs.append(RouteOutput(route=id_to_token[int(own[0])], decoder=name, phrases=phrases[row]))
        results[b].outputs.append(outputs[-1])
    if name not in model.decoder_names:
        for output in outputs:
            output.error = f"no decoder {name!r} is configured for the route {output.route}"
            output.unconfigured = True
        if raise_errors:
            raise ValueError(outputs[0].error)
        return
    decoder = model.get_submodule(name)
    first_images = [images[b][0] if images[b] else None for b in index]
    try:
        preds: list[Any] = _predict(decoder, groups, list(range(len(index))), first_images, options)
    except Exception as err:  # a failing decoder must not end the conversation
        if raise_errors:
            raise
        logger.exception("decoder %s failed on %d samples", name, len(index))
        preds = _predict_each(decoder, groups, first_images, options) if len(index) > 1 else [err]
    for output, pred in zip(outputs, preds):
        if isinstance(pred, Exception):
            output.error = f"decoder {name!r} failed: {pred}"
        else:
            output.result = pred


def _predict(decoder: Any, groups: QueryGroups, rows: list[int], images: list[Image.Image | None],
             options: dict) -> list[Any]:
    """The decoder's predictions for the group rows ``rows`` (``images``: their first images)."""
    inputs = to_device(decoder.prepare(images), groups.states.device)
    return decoder.predict(groups.states[rows], groups.mask[rows], inputs, groups.route_ids[rows], **options)


def _predict_each(decoder: Any, groups: QueryGroups, images: list[Image.Image | None], options: dict) -> list[Any]:
    """After a failed batch, each row alone: a row that fails again gets its exception, the others their result,
    so one sample's failure stays in its own answer."""
    preds: list[Any] = []
    for row, image in enumerate(images):
        try:
            preds.append(_predict(decoder, groups, [row], [image], options)[0])
        except Exception as err:
            logger.exception("decoder failed on sample row %d", row)
            preds.append(err)
    return preds
