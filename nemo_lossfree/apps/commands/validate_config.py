"""``nemo-lossfree validate-config FILE [key=value ...]``: check a run config.

Prints one line per problem, each starting with the key
(``lossfree.update_rate: must be a finite number >= 0, got -0.001``), and
exits 2; prints warnings (``warning: <key>: ...``) and a one-paragraph
summary and exits 0 when the config is valid. Never a traceback for a bad
config: it is user input.

``validate`` is the one check of a run config: ``nemo-lossfree slurm`` calls
it too, before it writes or submits anything, so a job reaches the queue only
if this command accepts its config and layout.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping

from nemo_lossfree.exit_codes import EXIT_USAGE
from nemo_lossfree.runconfig.load import RunConfigError, load_run_config
from nemo_lossfree.runconfig.validate import check, describe


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=help_text + ". Exit code 0: valid; 2: problems (one line each, naming the key).",
    )
    parser.add_argument("config", metavar="FILE", help="YAML run config (see configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides such as lossfree.enabled=true model.num_layers=4 (YAML scalar typing)",
    )
    return parser


def validate(config: Mapping[str, Any], prefix: str = "") -> tuple[list[str], dict[str, Any]]:
    """Check a loaded run config; print its warnings and problems to stderr, one line each.

    Returns ``(problems, facts)``; the caller says what a problem means for
    it (``validate-config``: a summary and exit 2; ``slurm``: nothing is
    written or submitted). ``prefix`` starts every line (the command's name).
    """
    problems, warnings, facts = check(config)
    for warning in warnings:
        print(f"{prefix}warning: {warning}", file=sys.stderr)
    for problem in problems:
        print(f"{prefix}{problem}", file=sys.stderr)
    return problems, facts


def run(args: argparse.Namespace) -> int:
    try:
        config = load_run_config(args.config, args.overrides)
    except RunConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    problems, facts = validate(config)
    if problems:
        print(f"{args.config}: {len(problems)} problem(s)", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.config}: valid. {describe(config, facts)}")
    return 0
