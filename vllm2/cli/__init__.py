"""The ``vllm2`` command: ``vllm2 SUBCOMMAND --help`` explains each one."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "chat": "talk to a model about an image; routes run their decoders, pictures are saved",
    "train": "train a model (HF Trainer + DeepSpeed; --nproc N launches N processes per node)",
    "bench": "measure a model on a task's dataset (COCO AP, Acc@0.5, cIoU, keypoint AP, VQA, CIDEr, CLIP); writes JSON",
    "demo": "a local web page (gradio) to chat with a model about an image and see its boxes, masks and images",
    "serve": "an OpenAI-compatible HTTP server (chat completions, images) with dynamic batching",
    "tower": "stage 0: pretrain an open_clip vision tower by patch-phrase contrast; linear-probe a tower's features",
    "decoder": "stage 0: pretrain a diffusion decoder (sd, ip2p) on caption embeddings; writes a diffusers folder",
    "data": "make datasets: `data shapes` writes the synthetic shapes world in every task's format",
    "convert": "convert released VisionLLM v2 weights (`convert official SRC DST`) into a vllm2 model folder",
    "export": "write a model folder anew; --merge-lora folds the LoRA adapters into the LLM (a plain folder)",
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``vllm2 SUBCOMMAND ...`` to ``vllm2.cli.SUBCOMMAND.main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:<8} {text}" for name, text in SUBCOMMANDS.items()]
        print("usage: vllm2 SUBCOMMAND [options]   (vllm2 SUBCOMMAND --help for details)\n\nsubcommands:\n"
              + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(f"vllm2.cli.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
