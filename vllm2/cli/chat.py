"""``vllm2 chat``: one-shot (``--prompt``), a batch of prompts (``--batch``), or a multi-turn REPL about an image.

``--batch FILE`` reads a JSON list (or JSON lines) of ``{"image": PATH | null, "prompt": TEXT, "task": LABEL?,
"expect": GROUND_TRUTH?}`` items (image paths relative to the file; the optional label heads the item's tile in
``OUT/sheet.png``) and answers them all in ONE batched generation: samples that route and samples that do not decode
side by side. Items with ``expect`` (``{"rule": describe | count | detect | segment | find | pose | draw | edit, ...}``,
see vllm2.bench.judges) are judged with the benchmarks' rules: one line per item (task, right or wrong, the reason),
"N of M right", and ``right`` / ``reason`` in ``OUT/answers.jsonl``.

Routes the model emits run their decoders; annotated pictures (boxes, masks, keypoints) and generated or edited
images are written to ``--out`` and their paths printed. ``--json`` prints one JSON object per turn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from ..bench.judges import RULES, Verdict, judge
from ..chat import ChatResult, RouteOutput, history_text
from ..images import load_image
from ..region import box_to_mask, point_to_mask
from ..visualize import contact_sheet, draw_result
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
    parser.add_argument("--prompt", help="ask once and exit; without it (and without --batch), start a REPL")
    parser.add_argument("--batch", metavar="FILE", help="answer every {image, prompt} item of a JSON file in one batch")
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


def save_outputs(result: ChatResult, image: Image.Image | None, out_dir: Path, stem: str) -> list[str | None]:
    """Write the pictures of one answer; returns, per output, the path written (None: nothing to draw)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[str | None] = []
    for i, output in enumerate(result.outputs):
        picture = None
        if isinstance(output.result, Image.Image):
            picture = output.result
        elif isinstance(output.result, dict) and image is not None:
            picture = draw_result(image, output.result, output.phrases)
        path = None
        if picture is not None:
            path = str(out_dir / f"{stem}_{i}_{output.decoder}.png")
            picture.save(path)
        paths.append(path)
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


def _report(result: ChatResult, paths: list[str | None], record: dict[str, Any], as_json: bool, indent: str) -> str:
    """Print one answer (a JSON line, or the text, decoder errors and pictures); returns its JSON line."""
    line = json.dumps({**record, "text": result.text, "num_tokens": result.num_tokens, "malformed": result.malformed,
                       "outputs": [_jsonable(o, p) for o, p in zip(result.outputs, paths)]})
    if as_json:
        print(line)
        return line
    print(f"{indent}{result.text}")
    if result.malformed:
        print(f"{indent}  ({result.malformed} malformed location elements skipped)")
    for output in result.outputs:
        if output.error:
            print(f"{indent}  [{output.route} -> {output.decoder}] {output.error}")
    for path in paths:
        if path:
            print(f"{indent}  wrote {path}")
    return line


def _turn(model, processor, args, image, regions, history, prompt: str, turn: int) -> ChatResult:
    result = model.chat(processor, [image], [prompt], [regions] if regions else None, history=[history],
                        max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                        top_p=args.top_p)[0]
    paths = save_outputs(result, image, Path(args.out), f"turn{turn}")
    _report(result, paths, {"turn": turn, "prompt": prompt}, args.json, "")
    sys.stdout.flush()
    return result


class BatchItem(NamedTuple):
    """One ``--batch`` item: the image path (None: no image), the prompt, the label (None: none) and the ground truth
    to judge the answer by (None: not judged)."""

    image: str | None
    prompt: str
    label: str | None = None
    expect: dict[str, Any] | None = None


def read_batch(path: str) -> list[BatchItem]:
    """The items of a ``--batch`` file; ``ValueError`` naming the file and item."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--batch: file {path!r} does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        items = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in
                                                                      text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"--batch: {path} is neither a JSON list nor JSON lines: {err}") from None
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(f"--batch: {path} item {i} needs a string 'prompt', got {item!r}")
        image = item.get("image")
        if image is not None and not isinstance(image, str):
            raise ValueError(f"--batch: {path} item {i}: 'image' must be a path or null, got {image!r}")
        label = item.get("task")
        if label is not None and not isinstance(label, str):
            raise ValueError(f"--batch: {path} item {i}: 'task' must be a string, got {label!r}")
        expect = item.get("expect")
        if expect is not None and not (isinstance(expect, dict) and expect.get("rule") in RULES):
            raise ValueError(f"--batch: {path} item {i}: 'expect' must be an object whose 'rule' is one of "
                             f"{list(RULES)}, got {expect!r}")
        out.append(BatchItem(str(file.parent / image) if image else None, item["prompt"], label, expect))
    if not out:
        raise ValueError(f"--batch: {path} has no items")
    return out


def _print_verdicts(items: list[BatchItem], verdicts: list[Verdict | None]) -> None:
    """One line per judged item (task, right or wrong, reason) and the total."""
    judged = [(item.label or f"item {i}", v) for i, (item, v) in enumerate(zip(items, verdicts)) if v is not None]
    if not judged:
        return
    width = max(len(name) for name, _ in judged)
    print("judged against each item's 'expect':")
    for name, verdict in judged:
        print(f"  {name:<{width}}  {'right' if verdict.right else 'wrong'}  {verdict.reason}")
    print(f"{sum(v.right for _, v in judged)} of {len(judged)} right")


def _batch(model, processor, args, items: list[BatchItem]) -> None:
    """Answer every item in one ``model.chat`` call; print each answer, write its pictures, every answer (with the
    verdict of the items that carry ``expect``) to ``OUT/answers.jsonl`` and a contact sheet of all items (picture,
    or input image, above the answer) to ``OUT/sheet.png``; then print the verdicts."""
    images = [load_image(item.image) if item.image else None for item in items]
    results = model.chat(processor, images, [item.prompt for item in items], max_new_tokens=args.max_new_tokens,
                         do_sample=args.sample, temperature=args.temperature, top_p=args.top_p)
    lines, tiles, verdicts = [], [], []
    for i, (item, image, result) in enumerate(zip(items, images, results)):
        if not args.json:
            print(f"[{i}] {item.prompt}")
        paths = save_outputs(result, image, Path(args.out), f"item{i}")
        record: dict[str, Any] = {"item": i, "image": item.image, "prompt": item.prompt}
        verdict = judge(result, item.expect, processor.routes, image) if item.expect is not None else None
        if verdict is not None:
            record.update(task=item.label, right=verdict.right, reason=verdict.reason)
        verdicts.append(verdict)
        lines.append(_report(result, paths, record, args.json, "    "))
        picture = next((p for p in paths if p), None)
        mark = "" if verdict is None else f" ({'right' if verdict.right else 'wrong'})"
        tiles.append((Image.open(picture) if picture else image, f"{item.label or item.prompt}{mark}: {result.text}"))
    out = Path(args.out)
    (out / "answers.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    contact_sheet(tiles).save(out / "sheet.png")
    if not args.json:
        print(f"answers: {out / 'answers.jsonl'}; all items: {out / 'sheet.png'}")
        _print_verdicts(items, verdicts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        if args.batch and (args.prompt or args.image or args.region or args.region_mask or args.point):
            raise ValueError("--batch takes its images and prompts from the file: drop --prompt, --image and regions")
        items = read_batch(args.batch) if args.batch else None
        image = load_image(args.image) if args.image else None
        regions = _region(args, image)
        model, processor, _ = load_model(args)
        if items is not None:
            _batch(model, processor, args, items)
            return 0
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
