"""Options and loading shared by the subcommands."""

from __future__ import annotations

import argparse
import logging
import sys

from ..config import load_config
from ..modeling import VisionLLMv2Model, build_model
from ..processor import VisionLLMv2Processor


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model DIR | --config YAML`` and trailing ``a.b=c`` overrides."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="DIR", help="a trained model folder (save_pretrained layout)")
    source.add_argument("--config", metavar="YAML", help="a config file or preset; builds an UNTRAINED random model")
    parser.add_argument("overrides", nargs="*", metavar="a.b=c", help="config overrides (with --config)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (model init with --config, sampling)")


def load_model(args: argparse.Namespace) -> tuple[VisionLLMv2Model, VisionLLMv2Processor, bool]:
    """The model and processor named by the arguments, and whether the model is untrained."""
    import torch

    torch.manual_seed(args.seed)
    if args.model:
        model = VisionLLMv2Model.from_pretrained(args.model).eval()
        return model, VisionLLMv2Processor.from_pretrained(args.model), False
    cfg = load_config(args.config, args.overrides)
    model = build_model(cfg)
    model.load_pretrained_components()
    untrained = not cfg.llm.pretrained
    if untrained:
        print(f"note: {args.config} builds a randomly initialised, UNTRAINED model: its answers are noise",
              file=sys.stderr)
    return model.eval(), VisionLLMv2Processor.from_config(cfg), untrained


def load_processor(args: argparse.Namespace) -> VisionLLMv2Processor:
    """The processor named by the arguments, without loading the model."""
    if args.model:
        return VisionLLMv2Processor.from_pretrained(args.model)
    return VisionLLMv2Processor.from_config(load_config(args.config, args.overrides))


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
