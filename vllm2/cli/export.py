"""``vllm2 export --model DIR --out DIR [--merge-lora] [--base DIR --merge DIR ...]``: write a model folder anew.

With ``--merge-lora`` the LoRA adapters of a model trained with ``llm.lora.enabled`` are folded into the LLM's weights
(peft's ``merge_and_unload``): the output is a plain folder (safetensors, the config says LoRA is off, the processor
and tokenizer beside it) that loads and runs without peft's wrapping and gives the same logits. Without it the folder
is written again as it loads (safetensors). Load the result with ``VisionLLMv2Model.from_pretrained(OUT)`` or
``vllm2 chat --model OUT``.

With ``--base B --merge A``, the model at ``--model`` and the run at A both began from B and trained disjoint parts
(stages 3a and 3b of the shapes recipe, side by side): the output takes every weight A changed from B; a weight both
changed is an error naming it (:mod:`vllm2.merge`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .common import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm2 export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="DIR", required=True, help="a vllm2 model folder (e.g. OUTPUT_DIR/final)")
    parser.add_argument("--out", metavar="DIR", required=True, help="the output folder (new or empty)")
    parser.add_argument("--merge-lora", action="store_true", help="fold the LoRA adapters into the LLM's weights")
    parser.add_argument("--merge", metavar="DIR", nargs="+", default=[],
                        help="model folders of runs that began at --base: take every weight they changed")
    parser.add_argument("--base", metavar="DIR", help="the folder the --model run and the --merge runs began from")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def export(model_dir: str | Path, out: str | Path, merge_lora: bool = False, merge: Sequence[str] = (),
           base: str | Path | None = None) -> dict[str, int]:
    """Load ``model_dir``, optionally take the weights the ``merge`` runs changed from ``base`` and merge its LoRA
    adapters, and save the model and its processor to ``out``.

    Returns:
        each ``merge`` folder -> how many weights were taken from it.

    Raises:
        ValueError: ``out`` is not empty, ``merge`` without ``base`` (or a weight two runs changed), or
            ``merge_lora`` for a model without LoRA adapters.
    """
    from ..merge import merge_changes
    from ..modeling import VisionLLMv2Model
    from ..processor import VisionLLMv2Processor

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {str(out)!r} is not empty")
    if bool(merge) != (base is not None):
        raise ValueError("--merge and --base go together: the runs to take changes from and the folder they began at")
    model = VisionLLMv2Model.from_pretrained(model_dir)
    taken = merge_changes(model, base, merge) if merge else {}
    processor = VisionLLMv2Processor.from_pretrained(model_dir)
    if merge_lora:
        try:
            model.merge_lora()
        except ValueError as error:
            raise ValueError(f"--merge-lora: {str(model_dir)!r}: {error}") from None
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return {folder: list(taken.values()).count(folder) for folder in map(str, merge)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)
    try:
        taken = export(args.model, args.out, args.merge_lora, args.merge or (), args.base)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for folder, count in taken.items():
        print(f"took {count} weights from {folder}")
    print(f"wrote {args.out}" + (" (LoRA merged)" if args.merge_lora else ""))
    return 0
