"""``vllm2 decoder``: stage 0 of a diffusion decoder, before the LLM meets it.

``vllm2 decoder pretrain --config YAML [a.b=c ...] --decoder {sd,ip2p} --out DIR`` trains the UNet of
``decoders.<name>`` alone on the config's datasets of that decoder's tasks (``t2i`` for ``sd``, ``edit`` for
``ip2p``), conditioned on the frozen text encoder's embedding of each caption or instruction, as Stable Diffusion and
InstructPix2Pix were trained on CLIP's. It writes DIR as a local diffusers folder (``unet``, ``vae`` unless
pixel-space, ``scheduler``, ``text_encoder``) to use as ``decoders.<name>.pretrained_path``, and DIR/stage0.json
(losses, time). Prints that summary as one JSON object.

Example:
  vllm2 decoder pretrain --config configs/shapes/base.yaml --decoder ip2p --steps 2500 --out runs/shapes/ip2p
"""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from .common import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm2 decoder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    pretrain = actions.add_parser("pretrain", help="stage 0: train a diffusion decoder's UNet on caption embeddings")
    pretrain.add_argument("--config", required=True, metavar="YAML", help="config file or preset")
    pretrain.add_argument("overrides", nargs="*", metavar="a.b=c", help="config overrides")
    pretrain.add_argument("--decoder", required=True, help="the diffusion decoder to train: sd or ip2p")
    pretrain.add_argument("--out", required=True, metavar="DIR", help="the diffusers folder to write")
    pretrain.add_argument("--steps", type=int, default=2500, help="optimizer steps (default: %(default)s)")
    pretrain.add_argument("--batch-size", type=int, default=24, help="samples per step (default: %(default)s)")
    pretrain.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pretrain.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from ..config import load_config
    from ..decoder_pretrain import pretrain_diffusion

    try:
        cfg = load_config(args.config, args.overrides)
        with tqdm(total=args.steps, desc=f"stage 0 ({args.decoder})", disable=args.quiet) as bar:
            def tick(step: int, loss: float) -> None:
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

            summary = pretrain_diffusion(cfg, args.decoder, args.out, args.steps, args.batch_size, args.lr, args.seed,
                                         tick)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
