"""Super link against text transmission: tokens decoded and seconds per image for detection, grounding and keypoints.

Both models answer the same held-out prompts (the routed-benchmark questions of each task, rendered by each model's
own templates: the text model's det/pose questions also bind the class tokens) in the same process, one task and
model after the other, in batches with greedy decoding. ``tokens_per_image`` counts the positions the LLM decodes
(super link: the sampled tokens plus the query positions of each route; text: every location and class token);
``seconds_per_image`` is the wall time of ``model.chat`` (super link: decoders included; text: token parsing
included); ``malformed`` counts the text elements chat skipped. Ratios are text / super link.

Usage: ``python benchmarks/transmission.py --superlink data/shapes-model --text runs/shapes/text/final
--data data/shapes/val [--limit 64 --batch 16 --threads 2]``. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm2 import VisionLLMv2Processor  # noqa: E402
from vllm2.bench.tasks import build_task  # noqa: E402
from vllm2.data.templates import Templates  # noqa: E402
from vllm2.modeling import VisionLLMv2Model  # noqa: E402

FILES = {"det": "instances.json", "rec": "refcoco.jsonl", "pose": "keypoints.json"}


def measure(folder: str, task_name: str, data: Path, limit: int, batch: int) -> dict[str, float]:
    """Tokens and seconds per image of one model on one task's first ``limit`` held-out prompts."""
    model = VisionLLMv2Model.from_pretrained(folder).eval()
    processor = VisionLLMv2Processor.from_pretrained(folder)
    task = build_task(task_name).bind(processor.routes)
    dataset = task.build_dataset(data / FILES[task_name], None, Templates(processor.routes,
                                 text=processor.text_link), "question")
    samples = [dataset[i] for i in range(min(limit, len(dataset)))]
    tokens, seconds, malformed = 0, 0.0, 0
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        begin = time.perf_counter()
        results = model.chat(processor, [s.images for s in chunk], [s.turns[-1][1] for s in chunk],
                             max_new_tokens=task.max_new_tokens, decoder_options=task.decoder_options())
        seconds += time.perf_counter() - begin
        tokens += sum(r.num_tokens for r in results)
        malformed += sum(r.malformed for r in results)
    return {"tokens_per_image": tokens / len(samples), "seconds_per_image": seconds / len(samples),
            "malformed": malformed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--superlink", required=True, help="super-link model folder")
    parser.add_argument("--text", required=True, help="text-transmission model folder")
    parser.add_argument("--data", required=True, help="held-out shapes world (instances/refcoco/keypoints files)")
    parser.add_argument("--limit", type=int, default=64, help="prompts per task")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = {"limit": args.limit, "batch": args.batch, "threads": args.threads}
    for task in FILES:
        base = measure(args.superlink, task, Path(args.data), args.limit, args.batch)
        text = measure(args.text, task, Path(args.data), args.limit, args.batch)
        out[task] = {"superlink": base, "text": text,
                     "token_ratio": text["tokens_per_image"] / base["tokens_per_image"],
                     "latency_ratio": text["seconds_per_image"] / base["seconds_per_image"]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
