"""``vllm2 serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a model.

Endpoints: POST /v1/chat/completions (text and image_url parts, streaming), POST /v1/images/generations,
POST /v1/images/edits, GET /v1/models, GET /health. Route outputs (boxes, COCO RLE masks, keypoints, base64 PNG
images, per-output errors) travel in each choice's "vllm2_outputs" field; see the vllm2.serve module docstring.

Requests that arrive within --batch-wait-ms of each other are answered by one batched generation (up to
--max-batch); greedy answers equal those of the same requests sent one at a time. --replicas N loads the model
in N worker processes that answer N batches at once (each with 1/N of the cores unless OMP_NUM_THREADS is set: the
benchmark's 2-core machine serves 16 clients best with --replicas 2 --max-batch 8). The server listens on
127.0.0.1 unless --host says otherwise. SIGTERM (or Ctrl-C) stops accepting, answers the requests in flight, exits.

Example:
  vllm2 serve --model data/shapes-model --port 8000
  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "shapes-model", "messages": [{"role": "user", "content": "Hello"}]}'
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ..serve.replicas import Replica, ReplicaError
from .common import add_model_args, load_model, load_processor, setup_logging

if TYPE_CHECKING:
    from ..modeling import VisionLLMv2Model
    from ..processor import VisionLLMv2Processor

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm2 serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine "
                        "only; 0.0.0.0 exposes the server to the network: set --api-key)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--model-name", help="the model id clients send (default: the model folder's name, or the "
                        "config's)")
    parser.add_argument("--api-key", default=os.environ.get("VLLM2_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 requests (default: $VLLM2_API_KEY; none)")
    parser.add_argument("--max-batch", type=int, default=16, help="most requests in one batch (default: %(default)s)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="a batch closes when this long passes without a new request, or at --max-batch "
                        "(default: %(default)s)")
    parser.add_argument("--allow-path", action="append", default=[], metavar="ROOT",
                        help="serve image_url local files (file:// or paths) under ROOT; repeatable (default: none)")
    parser.add_argument("--max-tokens-cap", type=int, default=512,
                        help="largest max_tokens accepted, also the default (default: %(default)s)")
    parser.add_argument("--max-request-bytes", type=int, default=32 * 2**20,
                        help="largest request body in bytes (default: %(default)s)")
    parser.add_argument("--max-images", type=int, default=1,
                        help="images per conversation (default: %(default)s; the decoders see the first)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="model copies, each in its own process answering one batch at a time (default: "
                        "%(default)s, in the server's process)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _load_replica(args: argparse.Namespace) -> tuple[VisionLLMv2Model, VisionLLMv2Processor]:
    """The model and processor of a replica process (module-level: it pickles)."""
    model, processor, _ = load_model(args)
    return model, processor


def _load(args: argparse.Namespace) -> tuple[VisionLLMv2Model | None, VisionLLMv2Processor, list[Replica]]:
    """The model in this process (``--replicas 1``), or the processor here and the model in ``--replicas``
    processes, each with its share of the cores unless ``OMP_NUM_THREADS`` says otherwise."""
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if args.replicas == 1:
        model, processor, _ = load_model(args)
        return model, processor, []
    processor = load_processor(args)
    threads = None if "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // args.replicas)
    replicas = [Replica(partial(_load_replica, args), threads) for _ in range(args.replicas)]
    try:
        for replica in replicas:
            replica.wait_ready()
    except ReplicaError:
        for replica in replicas:
            replica.close()
        raise
    return None, processor, replicas


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from ..serve import ServeOptions, create_app

    try:
        options = ServeOptions(
            model_name=args.model_name or Path(args.model or args.config).stem, api_key=args.api_key,
            max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, allow_paths=tuple(args.allow_path),
            max_tokens_cap=args.max_tokens_cap, max_request_bytes=args.max_request_bytes, max_images=args.max_images)
        model, processor, replicas = _load(args)
    except (ValueError, FileNotFoundError, KeyError, ReplicaError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK:
        logger.warning("listening on %s: anyone who can reach this address can use the model%s", args.host,
                       "" if args.api_key else " (no --api-key)")
    import uvicorn

    # uvicorn finishes the requests in flight on SIGTERM, then raises the signal again: exit 0 then.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"serving {options.model_name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:
        uvicorn.run(create_app(model, processor, options, replicas), host=args.host, port=args.port,
                    log_level="info" if args.verbose else "warning", timeout_graceful_shutdown=None)
    except KeyboardInterrupt:  # Ctrl-C, raised again after the same graceful shutdown
        pass
    return 0
