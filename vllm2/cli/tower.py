"""``vllm2 tower``: stage 0, the vision tower before the LLM meets it.

``vllm2 tower pretrain --config YAML [a.b=c ...] --data instances.json --out DIR`` trains the open_clip tower of
``vision.*`` by patch-phrase contrast (open_clip's ClipLoss between each patch's features and the text tower's
embedding of the phrase of the object under it, "red small circle on the left", or "background") and writes
DIR/tower.pt, an open_clip checkpoint to use as ``vision.pretrained``, and DIR/stage0.json (losses, time, held-out
zero-shot phrase accuracy).

``vllm2 tower probe (--model DIR | --config YAML [a.b=c ...]) --train instances.json --held-out instances.json``
fits a linear probe per field (category, each attribute, left/right side) on the frozen patch features of a tower
(a trained model's, or ``vision.pretrained``'s) and prints the held-out accuracies as one JSON object: the fast test
of a tower, seconds instead of a training run.

Examples:
  vllm2 tower pretrain --config configs/shapes.yaml --data data/shapes/train/instances.json \\
      --held-out data/shapes/val/instances.json --out runs/shapes/stage0
  vllm2 tower probe --config configs/shapes.yaml vision.pretrained=runs/shapes/stage0/tower.pt \\
      --train data/shapes/train/instances.json --held-out data/shapes/val/instances.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from .common import add_model_args, load_model, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm2 tower", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    pretrain = actions.add_parser("pretrain", help="stage 0: patch-phrase contrastive training of the tower")
    pretrain.add_argument("--config", required=True, metavar="YAML", help="config file or preset (its vision.*)")
    pretrain.add_argument("overrides", nargs="*", metavar="a.b=c", help="config overrides")
    pretrain.add_argument("--data", required=True, help="COCO instances JSON of the training images")
    pretrain.add_argument("--held-out", help="COCO instances JSON scored by zero-shot phrase accuracy at the end")
    pretrain.add_argument("--out", required=True, metavar="DIR", help="writes DIR/tower.pt and DIR/stage0.json")
    pretrain.add_argument("--limit", type=int, help="read only the first N training images")
    pretrain.add_argument("--steps", type=int, default=2000, help="optimizer steps (default: %(default)s)")
    pretrain.add_argument("--batch-size", type=int, default=64, help="images per step (default: %(default)s)")
    pretrain.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    pretrain.add_argument("--rounds", type=int, default=16,
                          help="unique-phrase draws of patch/phrase pairs per step (default: %(default)s)")
    pretrain.add_argument("--seed", type=int, default=0)
    probe = actions.add_parser("probe", help="linear probe of frozen patch features; prints one JSON object")
    add_model_args(probe)
    probe.add_argument("--train", required=True, help="COCO instances JSON the probes are fitted on")
    probe.add_argument("--held-out", required=True, help="COCO instances JSON the probes are scored on")
    probe.add_argument("--limit", type=int, default=1000, help="training images for the probes (default: %(default)s)")
    probe.add_argument("--out", help="also write the JSON here")
    for sub in (pretrain, probe):
        sub.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        sub.add_argument("-v", "--verbose", action="store_true")
    return parser


def _pretrain(args: argparse.Namespace) -> dict:
    from ..config import load_config
    from ..processor import VisionLLMv2Processor
    from ..tower import patch_labels, pretrain_tower

    cfg = load_config(args.config, args.overrides)
    pixels, grid = VisionLLMv2Processor.from_config(cfg).pixel_values, cfg.vision.image_size // cfg.vision.patch_size
    train = patch_labels(args.data, pixels, grid, args.limit)
    held_out = patch_labels(args.held_out, pixels, grid, vocab=train) if args.held_out else None
    with tqdm(total=args.steps, desc="stage 0", disable=args.quiet) as bar:
        def tick(step: int, loss: float) -> None:
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        return pretrain_tower(cfg.vision, train, args.out, args.steps, args.batch_size, args.lr, args.rounds,
                              args.seed, held_out, tick)


def _probe(args: argparse.Namespace) -> dict:
    from ..tower import patch_labels, probe_tower

    model, processor, _ = load_model(args)
    grid = processor.vision.image_size // processor.vision.patch_size
    train = patch_labels(args.train, processor.pixel_values, grid, args.limit)
    return probe_tower(model.vis_encoder, train, patch_labels(args.held_out, processor.pixel_values, grid, vocab=train))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        result = _pretrain(args) if args.action == "pretrain" else _probe(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.action == "probe" and args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "phrases"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
