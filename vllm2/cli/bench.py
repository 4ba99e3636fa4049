"""``vllm2 bench TASK``: measure a model on one task's dataset and write a result JSON.

Tasks: det, seg (COCO bbox/segm AP), semseg (mIoU, pixel accuracy), rec (Acc@0.5), res (cIoU/mIoU), pose (keypoint
AP, PCK), vqa (VQA accuracy), caption (CIDEr, BLEU-4), gen (CLIP score), edit (CLIP-I, CLIP-T, directional CLIP); on
shapes-world data ``--judge shapes`` scores gen (colour and shape accuracy) and edit (edit accuracy) by rule instead
of CLIP.

Data (``--data``): det/seg/pose read a COCO annotation file (instances / person_keypoints); rec/res a referring
expression file (``{"image", "bbox", "expressions" | "sentences", "segmentation"?}`` records); vqa
``{"image", "question", "answers", "question_type"?}`` records (accuracy per type when given); caption
``{"image", "captions"}``; gen ``{"image", "caption"}``; edit ``{"input", "instruction", "output", "input_caption"?,
"output_caption"?}``. Images are relative to ``--image-root`` (default: the annotation file's folder).

semseg reads a folder in the ADE20K layout: ``images/`` (RGB images), ``annotations/`` (a PNG label map per image,
same file stem and size, 8-bit single channel class indices: 0 = background / "other", 255 = ignore) and
``classes.txt`` (one class name per line, line k = class k, line 0 the background's name). The model is asked to
segment classes 1..K-1; its ``[SEG]`` masks scoring above ``--mask-score-threshold`` are painted into a label map
(higher score wins, uncovered pixels are background). Reported: mIoU (mean over classes with a non-zero union),
aAcc (pixel accuracy), mAcc, per-class IoU and accuracy, and the counts of missing answers and unknown phrases.
``--reduce-zero-label`` ignores pixels labelled 0 and leaves class 0 out (ADE20K's protocol).

Modes: ``routed`` (default) asks the question only and lets the model choose its routes (a wrong or missing route is a
miss; the routing accuracy is reported, and the misses are counted in ``misrouted`` with the routes the first ones
took); ``teacher-forced`` feeds the gold answer with its routes in one forward pass
(the official evaluation protocol of the decoder tasks).

Failures show in every task's result: a decoder that raised, and a route the model wrote to a decoder it does not
have, are scored as misses and counted in ``decoder_errors`` and ``unconfigured_routes`` (``{"count", "first"}``, the
first messages naming their samples). ``--strict`` stops the run with the decoder's exception instead (teacher-forced
runs always stop).

Every file is checked (annotation file, every record and image of the run, model folder, CLIP weights) before the
model runs. ``--nproc N`` runs N processes through torchrun (gloo) and merges their results.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import config_to_dict, load_config
from ..processor import VisionLLMv2Processor
from ..modeling import check_model_folder
from .common import add_model_args, load_model, setup_logging

logger = logging.getLogger(__name__)

ARGV_ENV = "VLLM2_BENCH_ARGV"  # the arguments of a torchrun worker (JSON list)


def build_parser() -> argparse.ArgumentParser:
    from ..bench.tasks import JUDGES, TASKS

    parser = argparse.ArgumentParser(prog="vllm2 bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(TASKS), help="the benchmark task")
    add_model_args(parser)
    parser.add_argument("--data", metavar="PATH", required=True,
                        help="the annotation file (semseg: the folder with images/, annotations/, classes.txt)")
    parser.add_argument("--image-root", metavar="DIR",
                        help="folder of the images (default: the data file's folder; semseg: DATA/images)")
    parser.add_argument("--split", help="split name recorded in the result (default: the data file's stem)")
    parser.add_argument("--mode", choices=("routed", "teacher-forced"), default="routed")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N items")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="routed mode answer budget (default per task: vqa 10, caption 30, det/seg 1024, ...)")
    parser.add_argument("--out", metavar="FILE", help="result JSON (default: bench_TASK_MODE.json)")
    parser.add_argument("--nproc", type=int, default=1, metavar="N", help="processes (torchrun, gloo)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: the local GPU if any)")
    parser.add_argument("--judge", choices=JUDGES, default="clip",
                        help="gen/edit scoring: CLIP metrics, or the shapes world's rule-based checkers (colour and "
                             "shape of a drawn object; edit made and the rest kept)")
    parser.add_argument("--clip-model", metavar="NAME", help="open_clip model name or config JSON path (gen, edit)")
    parser.add_argument("--clip-weights", metavar="FILE", help="its local checkpoint file (gen, edit)")
    parser.add_argument("--sigmas", metavar="S1,S2,...", help="OKS sigmas per keypoint (pose; default per skeleton)")
    parser.add_argument("--pck-alpha", type=float, default=0.2, help="PCK threshold / longer box side (pose)")
    parser.add_argument("--mask-score-threshold", type=float, default=0.1, metavar="S",
                        help="semseg: a predicted mask paints its class only with a score above S "
                             "(default: %(default)s)")
    parser.add_argument("--reduce-zero-label", action="store_true",
                        help="semseg: ignore pixels labelled 0 and leave class 0 out of the metrics (ADE20K)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first decoder error or route to an unconfigured decoder (default: count "
                             "them in the result and score the sample as a miss)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _check_args(args: argparse.Namespace, task_cls: Any) -> None:
    """Arguments and files that can be checked without reading the data or the model."""
    if args.mode == "teacher-forced" and not task_cls.teacher_forced:
        raise ValueError(f"task {args.task!r} has no decoder: it runs in routed mode only")
    for name in ("limit", "batch_size", "nproc", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if task_cls.data_is_folder:
        if not Path(args.data).is_dir():
            hint = ("; a shapes world written before generator version 3 has no semseg/: write it again with "
                    "`vllm2 data shapes`" if (Path(args.data).parent / "manifest.json").is_file() else "")
            raise FileNotFoundError(f"--data: folder {args.data!r} does not exist (task {args.task!r} reads a "
                                    f"folder with images/, annotations/ and classes.txt){hint}")
    elif not Path(args.data).is_file():
        raise FileNotFoundError(f"--data: annotation file {args.data!r} does not exist")
    if args.image_root is not None and not Path(args.image_root).is_dir():
        raise FileNotFoundError(f"--image-root: {args.image_root!r} is not a folder")
    if args.model is not None:
        folder = Path(args.model)
        check_model_folder(folder)
        if not list(folder.glob("*.safetensors")):
            raise FileNotFoundError(f"--model: {str(folder)!r} has no .safetensors weights")
    if args.model is not None and args.overrides:
        raise ValueError(f"config overrides {args.overrides} apply to --config only, not to --model")
    if (args.clip_model is None) != (args.clip_weights is None):
        raise ValueError("give --clip-model and --clip-weights together")
    if args.clip_weights is not None and not Path(args.clip_weights).is_file():
        raise FileNotFoundError(f"--clip-weights: checkpoint {args.clip_weights!r} does not exist")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out: folder {str(out.parent)!r} does not exist")


def _sigmas(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as err:
        raise ValueError(f"--sigmas must be comma-separated numbers, got {text!r}") from err


def _routes_and_config(args: argparse.Namespace):
    """The route table and project config, without building the model."""
    if args.model is not None:
        from ..modeling import VisionLLMv2Config

        processor = VisionLLMv2Processor.from_pretrained(args.model)
        return processor.routes, VisionLLMv2Config.from_pretrained(args.model).project
    cfg = load_config(args.config, args.overrides)
    return cfg.route_table(), cfg


def _device(name: str) -> str:
    if name != "auto":
        return name
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def _relaunch(argv: list[str], nproc: int) -> int:
    """Run this command in ``nproc`` processes with torchrun; returns its exit status.

    The arguments travel in the environment (:data:`ARGV_ENV`): torchrun would otherwise parse options such as
    ``--nproc`` as its own.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "vllm2.cli", "bench"]
    logger.info("launching %s with %s", " ".join(cmd), argv)
    return subprocess.call(cmd, env={**os.environ, ARGV_ENV: json.dumps(argv)})


def _agree(error: str | None, distributed: bool) -> str | None:
    """Share a setup error across ranks: every rank gets the first one."""
    if not distributed:
        return error
    import torch.distributed as dist

    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv and os.environ.get(ARGV_ENV):
        argv = json.loads(os.environ[ARGV_ENV])
    args = build_parser().parse_intermixed_args(argv)
    setup_logging(args.verbose)
    args.out = args.out or f"bench_{args.task}_{args.mode}.json"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.nproc > 1 and world == 1:
        return _relaunch(argv, args.nproc)
    distributed = world > 1
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    try:
        return _run(args, distributed)
    finally:
        if distributed:
            dist.barrier()
            dist.destroy_process_group()


def _prepare(args: argparse.Namespace, rank: int, world: int):
    """Check the arguments and files, build the bound task and its reader, and read this rank's items once.

    Returns:
        The task, the reader, the item indices of the run and the project config.
    """
    from ..bench import runner
    from ..bench.metrics_clip import load_clip_scorer
    from ..bench.tasks import TASKS, TaskOptions, build_task
    from ..data.templates import Templates

    _check_args(args, TASKS[args.task])
    options = TaskOptions(judge=args.judge, sigmas=_sigmas(args.sigmas), pck_alpha=args.pck_alpha,
                          mask_score_threshold=args.mask_score_threshold, reduce_zero_label=args.reduce_zero_label)
    routes, cfg = _routes_and_config(args)
    task = build_task(args.task, options).bind(routes)
    mode = "teacher_forced" if args.mode == "teacher-forced" else "question"
    templates = Templates(routes, text=cfg.text_link())
    if args.mode == "teacher-forced" and any(templates.writes_text(t) for t in task.route_tasks):
        raise ValueError(f"task {args.task!r}: a text-transmission model writes its answer as tokens and has no "
                         "decoder to teacher-force; use --mode routed")
    dataset = task.build_dataset(Path(args.data), Path(args.image_root) if args.image_root else None,
                                 templates, mode, max_image_pixels=cfg.vision.max_image_pixels)
    indices = list(range(min(len(dataset), args.limit or len(dataset))))
    runner.check_samples(dataset, runner.shard(indices, rank, world))
    if args.clip_weights is not None:
        options.clip = load_clip_scorer(args.clip_model, args.clip_weights, _device(args.device))
    task.check_options()
    args.max_new_tokens = args.max_new_tokens or task.max_new_tokens
    return task, dataset, indices, cfg


def _result(args: argparse.Namespace, summary: dict, dataset: Any, model: Any, weights: str, untrained: bool,
            seconds: float) -> dict[str, Any]:
    """The result file's content."""
    return {
        "task": args.task,
        "mode": args.mode,
        **summary,
        "model": {"folder": args.model, "config_file": args.config, "overrides": list(args.overrides),
                  "weights_sha256": weights, "untrained": untrained},
        "data": {"files": {"annotations": str(Path(args.data).resolve()),
                           "image_root": str(Path(dataset.image_root).resolve())},
                 "split": args.split or Path(args.data).stem, "limit": args.limit},
        "run": {"batch_size": args.batch_size, "nproc": int(os.environ.get("WORLD_SIZE", "1")),
                "max_new_tokens": args.max_new_tokens, "strict": args.strict, "seed": args.seed,
                "device": _device(args.device), "seconds": round(seconds, 3), "vllm2_version": __version__},
        "config": config_to_dict(model.cfg),
    }


def _run(args: argparse.Namespace, distributed: bool) -> int:
    from ..bench import runner

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    error = None
    try:
        task, dataset, indices, _ = _prepare(args, rank, world)
        model, processor, untrained = load_model(args)
    except (ValueError, KeyError, OSError) as err:
        error = str(err)
    error = _agree(error, distributed)
    if error:
        return _fail(error)

    model.to(_device(args.device))
    weights = runner.folder_weights_sha256(args.model) if args.model else runner.state_dict_sha256(model)
    if args.mode == "routed":
        predictor = runner.routed_predictor(model, processor, task.decoder_options(), args.max_new_tokens,
                                            strict=args.strict)
    else:
        predictor = runner.teacher_forced_predictor(model, processor, task.decoder_options())
    evaluate = runner.evaluate_sharded if distributed else runner.evaluate
    started = time.time()
    summary = evaluate(task, dataset, predictor, args.mode, indices, args.batch_size, progress=True)
    if summary is None:
        return 0
    result = _result(args, summary, dataset, model, weights, untrained, time.time() - started)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"task": args.task, "mode": args.mode, **summary}))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
