"""The benchmark runner: predict a dataset in batches (routed or teacher-forced), score every sample, shard over
processes and merge, summarise into metrics; weight hashing for the result file.

Routed mode (the default) shows the model the question only; it must write the routes itself (``model.chat``). A
sample whose emitted route tokens are not exactly the task's (a text task: none) is a miss, and the share of
correctly routed samples is reported as ``routing_accuracy``; the misses are counted in ``misrouted``, each first
message naming the sample and the routes it took instead. Teacher-forced mode feeds the gold answer with its
routes in one forward pass and runs each decoder's ``predict`` on the gathered query groups.

Failures show: a decoder that raised and a route to a decoder the model does not have are scored as misses and
counted, for every task alike, in ``decoder_errors`` and ``unconfigured_routes`` (``{"count", "first"}``: the number
and the first messages, each naming the sample's source). ``routed_predictor(..., strict=True)`` raises them instead;
teacher-forced runs always raise.

Sharding: the items are split into contiguous blocks, one per process; every process scores its block and the
records are gathered on rank 0, ordered by item and aggregated once, so the metrics are those of one process that
saw every item.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from tqdm import tqdm

from superlink import RouteTable

from ..data.readers import TaskDataset
from ..data.records import TaskSample
from ..device import to_device
from ..processor import Sample
from .tasks import BenchTask, DecoderPrediction, SamplePrediction

if TYPE_CHECKING:
    from ..chat import ChatResult
    from ..modeling import VisionLLMv2Model
    from ..processor import VisionLLMv2Processor

logger = logging.getLogger(__name__)

__all__ = ["FAILURES", "MISROUTED", "MODES", "Predictor", "Record", "check_samples", "evaluate", "evaluate_sharded",
           "folder_weights_sha256", "from_chat", "merge_records", "predict_records", "routed_predictor",
           "routes_in_text", "shard", "state_dict_sha256", "summarize", "teacher_forced_predictor"]

MODES = ("routed", "teacher-forced")
FAILURES = ("decoder_errors", "unconfigured_routes")  # summary keys of the counted decoder failures
MISROUTED = "misrouted"  # summary key (routed mode) of the samples whose routes were not the task's
MISROUTED_TEXT = 160  # characters of the answer a misrouted message quotes
FIRST_MESSAGES = 5  # messages kept per failure kind in a summary
Predictor = Callable[[list[TaskSample]], list[SamplePrediction]]
# (item index, routed correctly, the task's score record, (failure kind, message) of each failed decoder output)
Record = tuple[int, bool, dict, list[tuple[str, str]]]


# ---------------------------------------------------------------------------------------------------- predictions

def routes_in_text(text: str, routes: RouteTable) -> list[str]:
    """The route tokens written in ``text``, in order."""
    pattern = "|".join(re.escape(t) for t in sorted(routes.route_tokens, key=len, reverse=True))
    return re.findall(pattern, text)


def _owners(tokens: Sequence[str], routes: RouteTable) -> list[str]:
    """The decoder of each route occurrence: its absorber's when the absorbing route occurs in the same sample."""
    present = set(tokens)
    absorber = {t: r.decoder for r in routes if r.token in present for t in r.absorbs}
    return [absorber.get(t, routes.route(t).decoder) for t in tokens]


def from_chat(result: ChatResult, routes: RouteTable) -> SamplePrediction:
    """A :class:`SamplePrediction` from a chat answer (its routes, one per query group)."""
    tokens = list(result.routes)
    owners = _owners(tokens, routes)
    outputs = {}
    for out in result.outputs:
        group_routes = [t for t, owner in zip(tokens, owners) if owner == out.decoder]
        if len(group_routes) != len(out.phrases):
            logger.warning("decoder %s: %d groups in the text but %d phrases", out.decoder, len(group_routes),
                           len(out.phrases))
        outputs[out.decoder] = DecoderPrediction(group_routes, list(out.phrases), out.result, out.error,
                                                 out.unconfigured)
    return SamplePrediction(result.text, tokens, outputs)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def routed_predictor(
    model: VisionLLMv2Model,
    processor: VisionLLMv2Processor,
    decoder_options: dict[str, dict[str, Any]] | None = None,
    max_new_tokens: int = 512,
    strict: bool = False,
) -> Predictor:
    """Greedy batched chat on the question turn; the model picks the routes. ``strict``: a decoder's exception (or a
    route to an unconfigured decoder) is raised instead of recorded in the prediction."""

    def predict(samples: list[TaskSample]) -> list[SamplePrediction]:
        prompts = [s.turns[-1][1] for s in samples]
        history = [list(s.turns[:-1]) for s in samples]
        regions = [[mask for mask, _ in s.regions] for s in samples]
        results = model.chat(processor, [list(s.images) or None for s in samples], prompts,
                             regions if any(regions) else None, history=history, max_new_tokens=max_new_tokens,
                             decoder_options=decoder_options, raise_decoder_errors=strict)
        return [from_chat(r, processor.routes) for r in results]

    return predict


def teacher_forced_predictor(
    model: VisionLLMv2Model,
    processor: VisionLLMv2Processor,
    decoder_options: dict[str, dict[str, Any]] | None = None,
) -> Predictor:
    """One forward pass over the gold conversation (left padded); each decoder predicts from its query groups."""
    routes = processor.routes
    options = decoder_options or {}

    @torch.no_grad()
    def predict(samples: list[TaskSample]) -> list[SamplePrediction]:
        device = _device(model)
        batch = processor([Sample(s.turns, s.images, s.regions) for s in samples], padding_side="left").to(device)
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        id_to_token = dict(zip(model.bound.route_ids.tolist(), routes.route_tokens))
        preds = [SamplePrediction(routes=routes_in_text(s.turns[-1][1], routes)) for s in samples]
        for name, groups in (out.groups or {}).items():
            if name not in model.decoder_names:
                raise ValueError(f"the answers route to decoder {name!r}, which the model does not have")
            index = groups.batch_index.tolist()
            decoder = model.get_submodule(name)
            inputs = to_device(decoder.prepare([samples[b].images[0] if samples[b].images else None
                                                 for b in index]), device)
            results = decoder.predict(groups.states, groups.mask, inputs, groups.route_ids, **options.get(name, {}))
            for row, (b, result) in enumerate(zip(index, results)):
                tokens = [id_to_token[int(t)] for t in groups.route_ids[row][groups.mask[row]].tolist()]
                preds[b].outputs[name] = DecoderPrediction(tokens, None, result)
        return preds

    return predict


# ---------------------------------------------------------------------------------------------------- running

def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The contiguous block of ``indices`` that process ``rank`` of ``world_size`` handles."""
    n = len(indices)
    return list(indices[rank * n // world_size : (rank + 1) * n // world_size])


def check_samples(dataset: TaskDataset, indices: Sequence[int]) -> None:
    """Read every item once (records and images), so a bad file fails before any compute; raises the first error."""
    for i in indices:
        dataset[i]


def _misrouted(pred: SamplePrediction, expected: Sequence[str], source: str) -> list[tuple[str, str]]:
    """``[(MISROUTED, message)]`` when the routes ``pred`` took are not ``expected``, else ``[]``; the message names the
    sample, both route lists and the start of the answer."""
    if set(pred.routes) == set(expected):
        return []
    took, wanted = (" ".join(routes) or "(none)" for routes in (pred.routes, expected))
    text = pred.text if len(pred.text) <= MISROUTED_TEXT else pred.text[:MISROUTED_TEXT] + "..."
    return [(MISROUTED, f"{source}: routes {took}, expected {wanted}: {text!r}")]


def _failures(pred: SamplePrediction, source: str) -> list[tuple[str, str]]:
    """``(kind, message)`` of each decoder output of ``pred`` with an error; kind is one of :data:`FAILURES`."""
    return [("unconfigured_routes" if out.unconfigured else "decoder_errors", f"{source}: {out.error}")
            for out in pred.outputs.values() if out.error is not None]


def predict_records(
    task: BenchTask,
    dataset: TaskDataset,
    indices: Sequence[int],
    predictor: Predictor,
    mode: str = "routed",
    batch_size: int = 1,
    progress: bool = False,
) -> list[Record]:
    """Predict and score the items ``indices`` in batches.

    Args:
        task: the bound task.
        dataset: its reader.
        indices: the items, in order.
        predictor: samples -> predictions.
        mode: ``"routed"`` (wrong routes are misses) or ``"teacher-forced"``.
        batch_size: samples per predictor call.
        progress: show a progress bar.
    Returns:
        One :class:`Record` per item.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (known: {list(MODES)})")
    expected = task.expected_routes()
    records: list[Record] = []
    with tqdm(total=len(indices), desc=f"bench {task.name}", unit="sample", disable=not progress) as bar:
        for start in range(0, len(indices), batch_size):
            chunk = list(indices[start : start + batch_size])
            samples = [dataset[i] for i in chunk]
            preds = predictor(samples)
            if len(preds) != len(samples):
                raise RuntimeError(f"the predictor returned {len(preds)} predictions for {len(samples)} samples")
            for i, sample, pred in zip(chunk, samples, preds):
                misrouted = _misrouted(pred, expected, sample.source) if mode == "routed" else []
                score = task.score(dataset, i, sample, None if misrouted else pred)
                records.append((i, not misrouted, score, misrouted + _failures(pred, sample.source)))
            bar.update(len(chunk))
    return records


def merge_records(parts: Sequence[Sequence[Record]]) -> list[Record]:
    """The records of every shard, ordered by item; an item scored twice is an error."""
    merged = sorted((r for part in parts for r in part), key=lambda r: r[0])
    for a, b in zip(merged, merged[1:]):
        if a[0] == b[0]:
            raise ValueError(f"item {a[0]} was scored by two shards")
    return merged


def summarize(task: BenchTask, dataset: TaskDataset, records: Sequence[Record], mode: str) -> dict[str, Any]:
    """Metrics of a run: the task's aggregate, the sample count, (routed) the routing accuracy, and per kind of
    :data:`FAILURES` (routed: and :data:`MISROUTED`) the count and the first messages (logged as a warning when not
    zero)."""
    summary: dict[str, Any] = {"metrics": task.aggregate(dataset, [r[2] for r in records]),
                               "num_samples": len(records)}
    kinds = FAILURES
    if mode == "routed":
        summary["routing_accuracy"] = sum(r[1] for r in records) / len(records) if records else 0.0
        kinds = (MISROUTED, *FAILURES)
    for kind in kinds:
        messages = [message for r in records for k, message in r[3] if k == kind]
        summary[kind] = {"count": len(messages), "first": messages[:FIRST_MESSAGES]}
        if messages:
            logger.warning("%s: %d (scored as misses); first: %s", kind, len(messages), messages[0])
    return summary


def evaluate(
    task: BenchTask,
    dataset: TaskDataset,
    predictor: Predictor,
    mode: str = "routed",
    indices: Sequence[int] | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Run a task in this process (see :func:`predict_records`, :func:`summarize`)."""
    indices = range(len(dataset)) if indices is None else indices
    return summarize(task, dataset, predict_records(task, dataset, indices, predictor, mode, batch_size, progress),
                     mode)


def evaluate_sharded(
    task: BenchTask,
    dataset: TaskDataset,
    predictor: Predictor,
    mode: str = "routed",
    indices: Sequence[int] | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> dict[str, Any] | None:
    """Run a task over the processes of the initialised ``torch.distributed`` group.

    Each rank scores its :func:`shard`; rank 0 gathers, merges and summarises. A failure on any rank is raised on
    every rank (after the gather, so no rank waits forever).

    Returns:
        The summary on rank 0, None elsewhere.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    indices = range(len(dataset)) if indices is None else indices
    mine = shard(indices, rank, world)
    try:
        part: tuple[str | None, list[Record]] = (None, predict_records(task, dataset, mine, predictor, mode,
                                                                      batch_size, progress and rank == 0))
    except Exception as err:  # reported to every rank below
        logger.exception("rank %d failed", rank)
        part = (f"rank {rank}: {type(err).__name__}: {err}", [])
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, part)
    errors = [error for error, _ in parts if error]
    if errors:
        raise RuntimeError("benchmark failed: " + "; ".join(errors))
    if rank != 0:
        return None
    return summarize(task, dataset, merge_records([records for _, records in parts]), mode)


# ---------------------------------------------------------------------------------------------------- hashing

def folder_weights_sha256(folder: str | Path) -> str:
    """sha256 over the ``*.safetensors`` files of a model folder (file names and bytes, sorted by name)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model folder {str(folder)!r} has no .safetensors weights")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and raw bytes, sorted by name)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
