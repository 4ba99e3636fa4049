"""``vllm2 convert official SRC DST [a.b=c ...]``: turn released weights into a vllm2 model folder.

``official`` reads the OpenGVLab/VisionLLMv2 folder (config.json, tokenizer files, pytorch_model.bin.index.json and
its .bin shards; the shards are read with torch.load(weights_only=True), so a file that needs arbitrary unpickling is
refused), maps every tensor through the key table of ``vllm2.convert``, checks shapes and token ids, and writes DST
(safetensors via save_pretrained, the processor, and conversion.json listing what was dropped or initialised).
Load the result with ``VisionLLMv2Model.from_pretrained(DST)`` or ``vllm2 chat --model DST``.

The check is strict: official keys the table does not map and our tensors nothing fills are listed and fail the
conversion, unless their prefix is passed with --allow-missing. The released keypoint decoder (UniPose) is not our
keypoint decoder, so a full conversion needs ``--allow-missing keypoint`` (its two super-link projections convert;
the rest starts from a fresh initialisation and needs training).
"""

from __future__ import annotations

import argparse
import sys

from .common import setup_logging

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm2 convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    official = sources.add_parser("official", help="the released OpenGVLab/VisionLLMv2 folder",
                                  description="Convert the released OpenGVLab/VisionLLMv2 folder SRC into DST.")
    official.add_argument("src", metavar="SRC", help="the official folder")
    official.add_argument("dst", metavar="DST", help="the output folder")
    official.add_argument("overrides", nargs="*", metavar="a.b=c", help="overrides of the base config")
    official.add_argument("--config", default="vllmv2-7b",
                          help="base preset or YAML for what config.json does not record (default: vllmv2-7b)")
    official.add_argument("--allow-missing", action="append", default=[], metavar="PREFIX",
                          help="drop unmapped official keys and initialise missing tensors under PREFIX "
                               "(e.g. keypoint); repeatable")
    official.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")
    official.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    official.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    official.add_argument("--seed", type=int, default=0, help="seed of the weights --allow-missing initialises")
    official.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)
    import torch

    from ..convert import convert_official

    torch.manual_seed(args.seed)
    try:
        report = convert_official(args.src, args.dst, args.config, args.overrides, args.allow_missing,
                                  getattr(torch, args.dtype), args.max_shard_size, args.overwrite)
    except (ValueError, FileNotFoundError, KeyError) as error:  # ConversionError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: {report['converted_tensors']} tensors converted, "
          f"{len(report['not_convertible'])} not convertible, {len(report['unmapped_dropped'])} dropped, "
          f"{len(report['initialised'])} initialised afresh (details in {args.dst}/conversion.json)")
    return 0
