"""``vllm2 train CONFIG [a.b=c ...]``: train with the HF Trainer (DeepSpeed via ``training.deepspeed``).

Without ``--nproc`` (or with 1) it runs in this process, which is handy for debugging. With ``--nproc N`` it relaunches
itself under ``torchrun`` (default) or the ``deepspeed`` launcher with N processes per node; ``--nnodes``,
``--node-rank``, ``--master-addr``, ``--master-port`` and ``--hostfile`` are passed through for multi-node runs. With
the deepspeed launcher and a hostfile, DeepSpeed starts the other nodes over ssh (pdsh), or with ``--no-ssh`` you start
the same command on each node with its ``--node-rank``.
On a CPU the processes talk over gloo. Checkpoints go to ``training.output_dir``; ``--resume`` continues from the
latest one (or the folder given); the final model is exported to ``OUTPUT_DIR/final`` (loadable with
``VisionLLMv2Model.from_pretrained``; ZeRO-3 shards are consolidated).

``--dry-run`` trains nothing: it builds the model on the meta device from the config alone (absent weight folders are
named and the YAML's sizes used) and prints the trainable and frozen parameters of each module and the per-GPU memory
of model states under ZeRO-2 and ZeRO-3 for ``--nproc`` x ``--nnodes`` GPUs, from DeepSpeed's estimators.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys

from .common import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm2 train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a config file or preset (e.g. configs/stages/stage2.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="a.b=c", help="config overrides")
    parser.add_argument("--nproc", type=int, default=1, help="processes per node (GPUs, or CPU workers)")
    parser.add_argument("--launcher", choices=["torchrun", "deepspeed"], default="torchrun")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=29512)
    parser.add_argument("--hostfile", help="deepspeed hostfile (with --launcher deepspeed)")
    parser.add_argument("--no-ssh", action="store_true",
                        help="with --hostfile: start this command on every node yourself, each with its --node-rank "
                             "(DeepSpeed's --no_ssh); without it DeepSpeed starts the other nodes over ssh (pdsh)")
    parser.add_argument("--resume", nargs="?", const=True, default=None,
                        help="resume from the latest checkpoint in output_dir, or from the folder given")
    parser.add_argument("--dry-run", action="store_true",
                        help="plan only: parameters per module and per-GPU memory of model states (no weights read)")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the plan as one JSON object")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


LAUNCH_FLAGS = ("--nproc", "--launcher", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--hostfile")
LAUNCH_SWITCHES = ("--no-ssh",)


def _strip_launch_flags(argv: list[str]) -> list[str]:
    """``argv`` without the launcher's own flags (``--flag value`` or ``--flag=value``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_FLAGS:
            skip = True
        elif arg not in LAUNCH_SWITCHES and not arg.startswith(tuple(f"{f}=" for f in LAUNCH_FLAGS)):
            out.append(arg)
    return out


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this command under a distributed launcher."""
    inner = _strip_launch_flags(argv)
    if args.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
               f"--nnodes={args.nnodes}", f"--node_rank={args.node_rank}", f"--master_addr={args.master_addr}",
               f"--master_port={args.master_port}", "-m", "vllm2.cli", "train", *inner]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_nodes={args.nnodes}",
               f"--num_gpus={args.nproc}", f"--master_addr={args.master_addr}", f"--master_port={args.master_port}",
               *([f"--hostfile={args.hostfile}"] if args.hostfile else []),
               *(["--no_ssh", f"--node_rank={args.node_rank}"] if args.no_ssh else []),
               "--no_local_rank", "--module", "vllm2.cli", "train", *inner]  # LOCAL_RANK is in the environment
    return subprocess.call(cmd)


def _dry_run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..plan import plan_training

    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's import logs to stdout; stdout is the plan's
            plan = plan_training(load_config(args.config, args.overrides), args.nproc, args.nnodes)
    except (KeyError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(plan.to_json() if args.json else plan.table())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.dry_run:
        return _dry_run(args)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch(args, argv)
    import torch

    from ..config import load_config
    from ..training import train

    try:
        cfg = load_config(args.config, args.overrides)
    except (KeyError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    trainer = train(cfg, resume=args.resume)
    if trainer.is_world_process_zero():
        print(f"final model: {trainer.final_dir}")
        if trainer.ema_dir:
            print(f"averaged weights (training.ema_decay): {trainer.ema_dir}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0
