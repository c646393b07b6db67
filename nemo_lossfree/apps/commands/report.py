"""``nemo-lossfree report``: a results.json as a table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nemo_lossfree.exit_codes import EXIT_USAGE


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a results.json, or the directory that holds it")
    parser.add_argument("--format", choices=("text", "markdown", "json"), default="text")
    return parser


def run(args: argparse.Namespace) -> int:
    from nemo_lossfree.apps.demo.pareto import describe
    from nemo_lossfree.apps.demo.results import format_markdown, format_table

    path = Path(args.results)
    if path.is_dir():
        path = path / "results.json"
    try:
        results = json.loads(path.read_text())
        arms = results["arms"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"nemo-lossfree report: results: cannot read {str(path)!r} ({exc})", file=sys.stderr)
        return EXIT_USAGE
    if not isinstance(arms, dict) or not arms:
        print(f"nemo-lossfree report: results: {str(path)!r} has no arms", file=sys.stderr)
        return EXIT_USAGE
    if args.format == "json":
        print(json.dumps(results, indent=2))
    elif args.format == "markdown":
        print(format_markdown(results))
    else:
        print(format_table(results))
        if "pareto" in results:
            print(describe(results["pareto"]))
    return 0
