"""The ``nemo-lossfree`` command.

Each subcommand lives in ``nemo_lossfree/apps/commands/<name>.py`` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``; modules are imported only
when their command runs, so ``--help`` stays fast and a command's heavy
imports (Megatron-Core, matplotlib) never slow the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from nemo_lossfree.exit_codes import EXIT_USAGE

# name -> one-line help; the module nemo_lossfree.apps.commands.<name> implements it.
COMMANDS = {
    "demo": "train a small Megatron-Core MoE on the CPU: loss-free balancing vs the alternatives",
    "simulate": "simulate the bias dynamics offline and recommend an update rate",
    "slurm": "render (and submit) a SLURM sbatch job",
    "validate-config": "check a YAML config before any GPU time is spent",
    "report": "summarise a demo or training run's results",
    "export": "turn a Megatron-Bridge checkpoint into a Hugging Face checkpoint, routing kept",
}


def _module(name: str):
    return importlib.import_module(f"nemo_lossfree.apps.commands.{name.replace('-', '_')}")


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemo-lossfree", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        if wanted == name:
            _module(name).add_parser(sub, name, help_text)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        module = _module(args.command)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("nemo_lossfree.apps.commands"):
            print(f"nemo-lossfree {args.command}: not available in this build", file=sys.stderr)
            return EXIT_USAGE
        raise
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
