"""The ``vllm2`` command: ``vllm2 SUBCOMMAND --help`` explains each one."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "chat": "talk to a model about an image; routes run their decoders, pictures are saved",
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``vllm2 SUBCOMMAND ...`` to ``vllm2.cli.SUBCOMMAND.main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:<8} {text}" for name, text in SUBCOMMANDS.items()]
        print("usage: vllm2 SUBCOMMAND [options]   (vllm2 SUBCOMMAND --help for details)\n\nsubcommands:\n"
              + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(f"vllm2.cli.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
