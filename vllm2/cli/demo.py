"""``vllm2 demo``: a local web page to chat with a model about an image.

Upload an image, ask questions (multi-turn; Reset or a new image starts over), give a region as a box or a point
(write <region> in the message), and see the answer's boxes, masks and keypoints drawn on the image, and the images it
generated or edited. The page listens on 127.0.0.1 unless --host says otherwise; uploads are limited to
--max-file-size. A model built from --config without pretrained weights is labelled UNTRAINED on the page.

Example: vllm2 demo --config configs/tiny.yaml --port 7860
"""

from __future__ import annotations

import argparse
import os
import sys

from .common import add_model_args, load_model, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm2 demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine "
                        "only; 0.0.0.0 exposes the demo to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")
    parser.add_argument("--max-file-size", default="10mb", help="largest accepted upload (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="token budget per answer (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        model, processor, untrained = load_model(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ..demo_app import DemoChat, build_demo, launch_demo

    demo = build_demo(DemoChat(model, processor, args.max_new_tokens), args.model or args.config, untrained)
    launch_demo(demo, args.host, args.port, args.max_file_size)
    return 0
