"""``vllm2 data``: make datasets.

``vllm2 data shapes --out DIR --n N --seed S`` writes the synthetic shapes world: N images of each kind (shape
scenes, stick-figure images, text-to-image pairs, edit triplets) with their annotations in the formats the training
readers and ``vllm2 bench`` accept, and DIR/manifest.json naming the reader and bench task of every file:

  instances.json        COCO instances (circle, square, triangle) with RLE masks: det, instance_seg, semantic_seg
  semseg/               the scenes in the ADE20K layout (images/, annotations/ label PNGs, classes.txt) for
                        `vllm2 bench semseg`
  refcoco.jsonl         referring expressions that identify one shape ("small red circle"): rec, res
  keypoints.json        COCO keypoints of stick figures (head, neck, hip, hands, feet): pose
  vqa.json              LLaVA conversations, single-word answers; vqa_bench.jsonl for `vllm2 bench vqa`
  captions.json         LLaVA captions; captions_bench.jsonl for `vllm2 bench caption`; captions_coco.json
  t2i.jsonl             one centred shape on a plain background with its caption ("a red circle")
  edit.jsonl            input, instruction ("make the circle blue"), the true edited output, and the edit

The data is deterministic for a seed, and image i does not depend on N: use another seed for a held-out split.

``vllm2 data demo --out DIR`` writes the prompts of ``make demo`` (DIR/demo.json: describe, count, detect, segment,
find, pose, draw, edit, each with its ground truth in "expect") and their images scene.png, figures.png and edit.png:
the first scene, figure image and edit input of the world ``vllm2 data shapes --seed 1 --gen-size 32`` writes (the
held-out world of ``make shapes-bench``); "draw" asks for that world's first text-to-image caption. Other files in
DIR are left alone.

Examples: vllm2 data shapes --out data/shapes/train --n 2000 --seed 0
          vllm2 data demo --out data/samples
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from .common import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm2 data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    shapes = actions.add_parser("shapes", help="write the synthetic shapes world (every task's files)",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shapes.add_argument("--out", required=True, metavar="DIR", help="output folder (created; must be empty)")
    shapes.add_argument("--n", type=int, required=True, help="images per kind: scenes, figure images, "
                        "text-to-image pairs and edit triplets (4 N images and triplets in all)")
    shapes.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    shapes.add_argument("--size", type=int, default=96, help="side of scene and figure images, 64-128 "
                        "(default: %(default)s)")
    shapes.add_argument("--gen-size", type=int, default=64, help="side of text-to-image and edit images, 32-128 "
                        "(default: %(default)s)")
    shapes.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    shapes.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    shapes.add_argument("-v", "--verbose", action="store_true")
    demo = actions.add_parser("demo", help="write the demo prompts (with ground truth) and images of `make demo`",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--out", required=True, metavar="DIR", help="output folder (created; demo.json, scene.png, "
                      "figures.png and edit.png are overwritten)")
    demo.add_argument("--seed", type=int, default=1, help="the world's seed (default: %(default)s, the held-out world)")
    demo.add_argument("--size", type=int, default=96, help="side of the scene and figure images (default: %(default)s)")
    demo.add_argument("--gen-size", type=int, default=32, help="side of the edit image and of the world's "
                      "text-to-image pairs (default: %(default)s)")
    demo.add_argument("-v", "--verbose", action="store_true")
    return parser


def _shapes(args: argparse.Namespace) -> int:
    from ..shapes import write_dataset

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.force)):
        print(f"error: --out {str(out)!r} is not an empty folder (use --force to write into it)", file=sys.stderr)
        return 2
    try:
        with tqdm(total=4 * max(args.n, 0), desc="shapes", unit="image", disable=args.quiet) as bar:
            write_dataset(out, args.n, args.seed, args.size, args.gen_size, progress=bar.update)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {4 * args.n} items and {out / 'manifest.json'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ..shapes import DEMO_FILES, write_demo

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"error: --out {str(out)!r} is not a folder", file=sys.stderr)
        return 2
    try:
        items = write_demo(out, args.seed, args.size, args.gen_size)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(items)} demo items: {', '.join(str(out / name) for name in DEMO_FILES)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return _demo(args) if args.action == "demo" else _shapes(args)
