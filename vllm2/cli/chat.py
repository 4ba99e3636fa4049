"""``vllm2 chat``: one-shot (``--prompt``) or a multi-turn REPL about an image.

Routes the model emits run their decoders; annotated pictures (boxes, masks, keypoints) and generated or edited
images are written to ``--out`` and their paths printed. ``--json`` prints one JSON object per turn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..chat import ChatResult, RouteOutput, history_text
from ..images import load_image
from ..region import box_to_mask, point_to_mask
from ..visualize import draw_result
from .common import add_model_args, load_model, setup_logging

HELP_REPL = "REPL commands: /image PATH (new image, resets history), /reset (forget history), /quit"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm2 chat", description=__doc__, epilog=HELP_REPL,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--image", metavar="PATH", help="the image to talk about (optional for text-only chat)")
    region = parser.add_mutually_exclusive_group()
    region.add_argument("--region", metavar="X1,Y1,X2,Y2", help="a box visual prompt, in pixels (use <region>)")
    region.add_argument("--region-mask", metavar="PNG", help="a mask visual prompt (non-zero = inside)")
    region.add_argument("--point", metavar="X,Y", help="a point visual prompt, in pixels")
    parser.add_argument("--prompt", help="ask once and exit; without it, start a REPL")
    parser.add_argument("--out", metavar="DIR", default="chat_out", help="where pictures are written")
    parser.add_argument("--json", action="store_true", help="print one JSON object per turn")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _floats(text: str, n: int, flag: str) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if len(values) != n:
        raise ValueError(f"{flag} needs {n} comma-separated numbers, got {text!r}")
    return values


def _region(args: argparse.Namespace, image: Image.Image | None) -> list[np.ndarray]:
    if not (args.region or args.region_mask or args.point):
        return []
    if image is None:
        raise ValueError("a region prompt needs --image")
    w, h = image.size
    if args.region:
        return [box_to_mask(tuple(_floats(args.region, 4, "--region")), w, h)]
    if args.point:
        return [point_to_mask(tuple(_floats(args.point, 2, "--point")), w, h)]
    mask = np.asarray(load_image(args.region_mask).convert("L")) > 0
    if mask.shape != (h, w):
        raise ValueError(f"--region-mask {args.region_mask} is {mask.shape[1]}x{mask.shape[0]}, the image {w}x{h}")
    return [mask]


def save_outputs(result: ChatResult, image: Image.Image | None, out_dir: Path, stem: str) -> list[str]:
    """Write the pictures of one answer; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, output in enumerate(result.outputs):
        picture = None
        if isinstance(output.result, Image.Image):
            picture = output.result
        elif isinstance(output.result, dict) and image is not None:
            picture = draw_result(image, output.result, output.phrases)
        if picture is not None:
            path = out_dir / f"{stem}_{i}_{output.decoder}.png"
            picture.save(path)
            paths.append(str(path))
    return paths


def _jsonable(output: RouteOutput, path: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {"route": output.route, "decoder": output.decoder, "phrases": output.phrases,
                            "error": output.error}
    if isinstance(output.result, dict):
        for key, value in output.result.items():
            if key != "masks" and hasattr(value, "tolist"):
                data[key] = value.tolist()
    if path:
        data["image"] = path
    return data


def _turn(model, processor, args, image, regions, history, prompt: str, turn: int) -> ChatResult:
    result = model.chat(processor, [image], [prompt], [regions] if regions else None, history=[history],
                        max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                        top_p=args.top_p)[0]
    paths = save_outputs(result, image, Path(args.out), f"turn{turn}")
    if args.json:
        by_output = dict(zip([o for o in result.outputs if o.result is not None and o.error is None], paths))
        print(json.dumps({"turn": turn, "prompt": prompt, "text": result.text,
                          "outputs": [_jsonable(o, by_output.get(o)) for o in result.outputs]}))
    else:
        print(result.text)
        for output in result.outputs:
            if output.error:
                print(f"  [{output.route} -> {output.decoder}] {output.error}")
        for path in paths:
            print(f"  wrote {path}")
    sys.stdout.flush()
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        image = load_image(args.image) if args.image else None
        regions = _region(args, image)
        model, processor, _ = load_model(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    history: list[tuple[str, str]] = []
    if args.prompt is not None:
        _turn(model, processor, args, image, regions, history, args.prompt, 0)
        return 0
    print(HELP_REPL, file=sys.stderr)
    turn = 0
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/reset":
            history = []
            continue
        if line.startswith("/image "):
            try:
                image, history = load_image(line.split(" ", 1)[1].strip()), []
            except (ValueError, FileNotFoundError) as err:
                print(f"error: {err}", file=sys.stderr)
            continue
        result = _turn(model, processor, args, image, regions, history, line, turn)
        history += [("user", ("<image>\n" if image is not None and not history else "") + line),
                    ("assistant", history_text(result.text, model.routes))]
        turn += 1
    return 0
