"""Batched chat: ``model.chat`` on a batch of prompts against the same prompts one at a time, side by side.

Model: ``configs/tiny.yaml`` with a larger LLM by default (``--llm`` overrides: width 256, 4 layers, 4 heads, MLP 704,
3.5M LLM parameters, about 23 times the tiny LLM's work per token) so each token costs real compute besides the
per-step Python overhead; the vision tower, bridge and decoders stay tiny. Weights are random (nothing is downloaded).
On a CPU the matrix products of a wider LLM cost the same batched or not, and the prompt prefill (about 180 tokens per
sample, mostly image patches) costs the same in both modes, so the speedup shrinks as the LLM grows: batching saves the
per-step overhead and the repeated reading of the weights.

Routing: a logits processor makes half of the samples emit a route token at a chosen step: route tokens spread over
the routes of ``model.routes`` with at most 8 queries ([DET] [GRD] [SEG] [POSE] in the official table; looked up with
``processor.tokenizer``), so the batch mixes decoders. ``--long-routes`` spreads them over the 64-query routes too
([GEN] [EDIT]): at such a step every batched sample feeds 65 positions. Routes run their decoders where the config has
them, and otherwise give error messages in the outputs (counted in ``decoder_errors``). The processor also bans the
end-of-sequence token, the placeholders and unforced route tokens, so every sample writes exactly ``--max-new-tokens``
tokens and routes only where told: both modes do the same work.

Usage: ``python benchmarks/chat.py [--batch 8 --max-new-tokens 64 --repeats 3 --threads 2]``. Prints one JSON object:
``batch_speedup`` (per-sample seconds / batched seconds), tokens per second both ways, how many batched answers
equal their one-at-a-time answers, and ``llm_step_speedup``: the same ratio for the LLM's own decode steps alone
(its forward on one new position per row over a KV cache of the prompt's length; no prefill, sampling, splice or
decoders), the most that batching the decode loop can give on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm2 import VisionLLMv2Processor, build_model, load_config  # noqa: E402
from vllm2.generation import new_cache  # noqa: E402
from vllm2.images import load_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLM = ["llm.hidden_size=256", "llm.intermediate_size=704", "llm.num_layers=4", "llm.num_heads=4"]
PROMPTS = [
    "What do you see in this image?",
    "Detect the red square and the blue circle.",
    "Describe the picture in detail, including every shape and its colour.",
    "How many shapes are there?",
    "Where is the triangle?",
    "Find every object in the image.",
    "Is there anything round?",
    "Write a short story about these shapes.",
]


class ForceRoutes:
    """Logits processor: chosen samples emit a chosen token at a chosen step; the ``banned`` ids are never sampled.

    Args:
        steps: ``[B]`` the sampled step at which each sample emits its token (-1: never).
        tokens: ``[B]`` the token each sample emits then.
        banned: ``[N]`` ids never sampled otherwise.
    """

    def __init__(self, steps: torch.Tensor, tokens: torch.Tensor, banned: torch.Tensor) -> None:
        self.steps, self.tokens, self.banned = steps, tokens, banned

    def __call__(self, sampled: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()  # [B, V]
        scores[:, self.banned] = float("-inf")
        rows = self.steps == sampled.shape[1]  # [B]
        scores[rows] = float("-inf")
        scores[rows, self.tokens[rows]] = 0.0
        return scores

    def rows(self, index: int) -> ForceRoutes:
        """The processor for sample ``index`` alone."""
        return ForceRoutes(self.steps[index : index + 1], self.tokens[index : index + 1], self.banned)


def forced_routes(model, processor, batch: int, long_routes: bool) -> ForceRoutes:
    """Every other sample routes, at steps 2, 3, 4, ...; tokens spread over the route table (by default over the
    routes with at most 8 queries: with ``long_routes`` also over the 64-query ones). Route tokens are otherwise
    banned, and so are the placeholders and the end-of-sequence token: every sample writes exactly
    ``max_new_tokens`` tokens and routes only where told."""
    tok = processor.tokenizer
    tokens = [r.token for r in model.routes.routes if long_routes or r.num_embs <= 8]
    picks = np.linspace(0, len(tokens) - 1, max(1, batch // 2)).round().astype(int)
    ids = torch.zeros(batch, dtype=torch.long)
    steps = torch.full((batch,), -1, dtype=torch.long)
    for j, pick in enumerate(picks):
        ids[2 * j] = tok.convert_tokens_to_ids(tokens[pick])
        steps[2 * j] = 2 + j
    special = list(model.routes.route_tokens) + list(model.routes.placeholder_tokens)
    banned = torch.tensor(tok.convert_tokens_to_ids(special) + [tok.eos_token_id])
    return ForceRoutes(steps, ids, banned)


def median_s(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in seconds (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def llm_step_speedup(llm: torch.nn.Module, batch: int, prompt_len: int, steps: int, repeats: int) -> float:
    """``batch`` x (seconds per decode step of one row) / (seconds per decode step of ``batch`` rows): the LLM's
    forward on one new position per row, ``steps`` steps over a cache grown from ``prompt_len`` random positions."""
    width = llm.config.hidden_size

    def decode(rows: int) -> float:
        cache = new_cache(llm.config)
        llm(inputs_embeds=torch.randn(rows, prompt_len, width), cache=cache, use_cache=True, logits_to_keep=1)
        step = torch.randn(rows, 1, width)  # [rows, 1, C]
        start = time.perf_counter()
        for _ in range(steps):
            llm(inputs_embeds=step, cache=cache, use_cache=True)
        return (time.perf_counter() - start) / steps

    one, many = (statistics.median(decode(rows) for _ in range(repeats + 1)) for rows in (1, batch))
    return batch * one / many


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--llm", nargs="*", default=LLM, metavar="a.b=c", 
                        help="config overrides (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--long-routes", action="store_true", help="also force routes with 64 queries ([GEN]/[EDIT])")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    cfg = load_config(args.config, args.llm)
    model = build_model(cfg).eval()
    processor = VisionLLMv2Processor.from_config(cfg)
    image = load_image(ROOT / "data" / "samples" / "shapes.png")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    force = forced_routes(model, processor, args.batch, args.long_routes)
    options = {"max_new_tokens": args.max_new_tokens}

    def batched():
        return model.chat(processor, [image] * args.batch, prompts, logits_processor=force, **options)

    def one_at_a_time():
        return [model.chat(processor, [image], [p], logits_processor=force.rows(i), **options)[0]
                for i, p in enumerate(prompts)]

    together, alone = batched(), one_at_a_time()
    batch_s = median_s(batched, args.repeats)
    single_s = median_s(one_at_a_time, args.repeats)
    tokens = args.batch * args.max_new_tokens
    routes = [o.route for r in together for o in r.outputs]
    result = {
        "batch_speedup": round(single_s / batch_s, 2),
        "batched_tokens_per_s": round(tokens / batch_s, 1),
        "one_at_a_time_tokens_per_s": round(tokens / single_s, 1),
        "batched_s": round(batch_s, 3),
        "one_at_a_time_s": round(single_s, 3),
        "llm_step_speedup": round(llm_step_speedup(model.llm, args.batch, max(r.prompt_tokens for r in together),
                                                   args.max_new_tokens, args.repeats), 2),
        "same_answers": sum(a.text == b.text for a, b in zip(together, alone)),
        "same_routes": [[o.route for o in r.outputs] for r in together]
        == [[o.route for o in r.outputs] for r in alone],
        "routes": routes,
        "decoder_errors": sum(o.error is not None for r in together for o in r.outputs),
        "batch": args.batch,
        "max_new_tokens": args.max_new_tokens,
        "llm_params": sum(p.numel() for p in model.llm.parameters()),
        "llm_overrides": args.llm,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
