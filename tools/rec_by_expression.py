"""REC Acc@0.5 of a shapes-world model grouped by the kinds of words in each referring expression.

Each word of an expression is a size (small/large), a colour, a kind (circle/square/triangle), "shape" or a position
(leftmost, topmost, ...); expressions group by that pattern (e.g. ``colour+kind``), scenes by their object count.
Routed, as ``vllm2 bench rec`` scores it (a misrouted expression is a miss).

Usage: ``python tools/rec_by_expression.py --model DIR [--data data/shapes/val/refcoco.jsonl]``; prints one JSON
object: pattern -> {count, acc}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm2.bench import runner  # noqa: E402
from vllm2.bench.metrics_ground import aligned_box_iou  # noqa: E402
from vllm2.cli import bench  # noqa: E402
from vllm2.cli.common import load_model  # noqa: E402

SIZES, KINDS = {"small", "large"}, {"circle", "square", "triangle"}


def word_kind(word: str) -> str:
    """What a word of an expression names: position, size, kind, shape (any kind) or colour."""
    if word.endswith("most"):
        return "position"
    if word in SIZES:
        return "size"
    if word in KINDS:
        return "kind"
    return "shape" if word == "shape" else "colour"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default="data/shapes/val/refcoco.jsonl")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    bench_args = bench.build_parser().parse_intermixed_args(
        ["rec", "--model", args.model, "--data", args.data, "--out", "/dev/null"])
    task, dataset, indices, _ = bench._prepare(bench_args, 0, 1)
    model, processor, _ = load_model(bench_args)
    predictor = runner.routed_predictor(model, processor, task.decoder_options(), bench_args.max_new_tokens)
    records = runner.predict_records(task, dataset, indices, predictor, "routed", args.batch_size, progress=True)
    objects = Counter(record["image"] for record in dataset.records)
    hits: dict[str, list[bool]] = defaultdict(list)
    for index, _, score, _ in records:
        position, choice = dataset.items[index]  # the (record, expression) pair of the item
        record = dataset.records[position]
        pred = score["pred"]
        hit = pred is not None and bool(aligned_box_iou(np.array([pred]), np.array([score["gt"]]))[0] >= 0.5)
        hits["+".join(word_kind(w) for w in record["expressions"][choice].split())].append(hit)
        count = objects[record["image"]]
        hits[f"scene with {count if count < 4 else '4+'} objects"].append(hit)
    print(json.dumps({k: {"count": len(v), "acc": round(float(np.mean(v)), 3)} for k, v in sorted(hits.items())}))


if __name__ == "__main__":
    main()
