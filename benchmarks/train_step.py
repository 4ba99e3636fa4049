"""One training step of the shapes recipe, profiled by component, and the stage-2 step against the single-run one.

``--profile CONFIG [a.b=c ...]``: runs ``--steps`` steps of the config's mixture (task-aligned batches, as training
draws them, the config's freezing applied) and prints one JSON object with the mean seconds per step spent in data
preparation (dataset items and collation), each top-level module's forward (module hooks: the vision tower, the
bridge, the LLM, each decoder), the backward pass (``heads.backward``: the LM head's and the decoders';
``llm.backward``: the LLM's), ``other`` (the rest of forward and backward: splice, gather, losses) and the optimizer
step.

Without ``--profile``: the speedup of the staged recipe's stage-2 step (``configs/shapes/stage2.yaml``: the stage-0
tower frozen) over the single-run recipe's step (``configs/shapes.yaml``: the same sizes, the ViT trained from scratch
with the LLM), on the same batches, steps alternating between the two models in one process. Prints one JSON object
whose ``speedup`` is new samples/s over old samples/s. Weights are random (no stage-0 file is needed); the data is the
shapes world in ``data/shapes/train`` (``make data/shapes/train/manifest.json``).

Usage: ``python benchmarks/train_step.py [--steps 6] [--threads 1]``,
``python benchmarks/train_step.py --profile configs/shapes/stage2.yaml``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm2 import VisionLLMv2Processor, build_model, load_config  # noqa: E402
from vllm2.data import Collator, build_mixture  # noqa: E402
from vllm2.training import TaskAlignedBatchSampler, apply_freeze, param_groups  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGE2, SINGLE = str(ROOT / "configs/shapes/stage2.yaml"), str(ROOT / "configs/shapes.yaml")
NO_FILES = ["vision.pretrained=null", "training.init_from=null"]  # random weights: only the step is measured


class Step:
    """A model, its optimizer and its data, stepping on batch indices drawn like training draws them."""

    def __init__(self, config: str, overrides: list[str], steps: int) -> None:
        cfg = load_config(config, [*NO_FILES, *overrides])
        torch.manual_seed(0)
        self.model = build_model(cfg).train()
        self.model.load_pretrained_components()
        apply_freeze(self.model, cfg.training.freeze)
        processor = VisionLLMv2Processor.from_config(cfg)
        self.dataset = build_mixture(cfg, processor.routes)
        self.collate = Collator(processor, cfg.training.max_length)
        sampler = TaskAlignedBatchSampler(self.dataset.tasks, cfg.training.per_device_batch_size, 1, 0, seed=0)
        self.batches = [b for b, _ in zip(sampler, range(steps))]
        t = cfg.training
        self.optimizer = torch.optim.AdamW(param_groups(self.model, t.learning_rate, t.weight_decay, t.lr_multipliers))
        self.times: dict[str, float] = defaultdict(float)
        self.marks: dict[str, float] | None = None  # set by _hook_modules

    def run(self, indices: list[int]) -> None:
        """One step on ``indices``; seconds per phase added to ``times``."""
        start = time.perf_counter()
        batch = self.collate([self.dataset[i] for i in indices])
        data = time.perf_counter()
        loss = self.model(**batch).loss
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        if self.marks and "llm" in self.marks:  # hooked, and the LLM took part in the backward pass
            llm, embeds = self.marks.pop("llm"), self.marks.pop("embeds", backward)
            self.times["heads.backward"] += llm - forward
            self.times["llm.backward"] += embeds - llm
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.5)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        for phase, seconds in (("data", data - start), ("forward", forward - data), ("backward", backward - forward),
                               ("optimizer", end - backward), ("step", end - start)):
            self.times[phase] += seconds


def _tensors(value: Any) -> list[torch.Tensor]:
    """The grad-requiring tensors in a nested output (tensors, tuples, lists, dicts, ModelOutputs)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.requires_grad else []
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    return [t for v in items for t in _tensors(v)]


def _hook_modules(step: Step) -> None:
    """Time each top-level module's forward (``<name>.forward``) and the LLM's backward into ``step.times``.

    The LLM's backward runs from the gradient reaching its output to the gradient leaving through its input embeddings
    (tensor hooks); everything before it in the backward pass is the heads' (``heads.backward``: the LM head and the
    decoders, whose losses are summed, so their backward passes interleave and are timed together)."""
    marks: dict[str, float] = {}

    def pre(mod: Any, args: Any, kwargs: Any) -> None:
        marks["start"] = time.perf_counter()

    def post(key: str) -> Callable[..., None]:
        def hook(mod: Any, args: Any, kwargs: Any, out: Any) -> None:
            step.times[f"{key}.forward"] += time.perf_counter() - marks.pop("start")
            if key == "llm" and out.hidden_states[-1].requires_grad:
                out.hidden_states[-1].register_hook(lambda grad: _mark(marks, "llm"))
                if kwargs["inputs_embeds"].requires_grad:
                    kwargs["inputs_embeds"].register_hook(lambda grad: _mark(marks, "embeds"))

        return hook

    for name, module in step.model.named_children():
        if any(p.numel() for p in module.parameters()):
            module.register_forward_pre_hook(pre, with_kwargs=True)
            module.register_forward_hook(post(name), with_kwargs=True)
    step.marks = marks


def _mark(marks: dict[str, float], key: str) -> None:
    marks.setdefault(key, time.perf_counter())


def profile(config: str, overrides: list[str], steps: int) -> dict[str, Any]:
    """Mean seconds per step by phase and module (the first step, a warm-up, is not counted)."""
    step = Step(config, overrides, steps + 1)
    step.run(step.batches[0])
    step.times.clear()
    _hook_modules(step)
    for indices in step.batches[1:]:
        step.run(indices)
    table = {k: round(v / steps, 4) for k, v in sorted(step.times.items()) if v / steps >= 5e-4}
    modules = sum(v for k, v in table.items() if "." in k)
    table["other"] = round(table["forward"] + table["backward"] - modules, 4)
    return {"config": config, "overrides": overrides, "steps": steps,
            "batch_size": len(step.batches[0]), "seconds_per_step": table}


def speedup(steps: int) -> dict[str, Any]:
    """Samples/s of the stage-2 step and of the single-run recipe's step on the same batches, alternating."""
    new, old = Step(STAGE2, [], steps + 1), Step(SINGLE, [], steps + 1)
    for s in (new, old):
        s.run(s.batches[0])
        s.times.clear()
    for indices in new.batches[1:]:
        new.run(indices)
        old.run(indices)
    samples = steps * len(new.batches[0])
    rate = {k: samples / s.times["step"] for k, s in (("new", new), ("old", old))}
    return {"speedup": round(rate["new"] / rate["old"], 3), "new_samples_per_s": round(rate["new"], 2),
            "old_samples_per_s": round(rate["old"], 2), "steps": steps, "batch_size": len(new.batches[0]),
            "new": {k: round(v / steps, 4) for k, v in new.times.items()},
            "old": {k: round(v / steps, 4) for k, v in old.times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", metavar="CONFIG", help="profile this config's step instead")
    parser.add_argument("overrides", nargs="*", metavar="a.b=c", help="config overrides (with --profile)")
    parser.add_argument("--steps", type=int, default=6, help="measured steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = profile(args.profile, args.overrides, args.steps) if args.profile else speedup(args.steps)
    print(json.dumps({**result, "threads": args.threads}))


if __name__ == "__main__":
    main()
