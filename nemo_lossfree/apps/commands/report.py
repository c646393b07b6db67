"""``nemo-lossfree report``: a run's results table and its load-balance pictures.

    nemo-lossfree report runs/demo                 # demo: results.json table + report_<arm>.png
    nemo-lossfree report /path/to/tensorboard_dir  # Megatron-LM / Bridge: report_<run>.png

RUN_DIR may be a ``results.json`` (the demo's table only), or a directory:
its ``results.json`` if any is printed as a table, and every directory under
it that holds TensorBoard event files with ``lossfree/...`` metrics gets a
figure ``report_<run>.png`` (in ``--out``, default RUN_DIR): the layers x
experts load heatmap over training, MaxVio_batch, the spread of the relative
load and the EP-rank overload. Figure paths go to stderr, so ``--format json``
stays pure JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nemo_lossfree.exit_codes import EXIT_USAGE


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or a results.json")
    parser.add_argument("--format", choices=("text", "markdown", "json"), default="text",
                        help="format of the results table (default %(default)s)")
    parser.add_argument("--out", default=None, help="where the figures go (default: RUN_DIR)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="the table only")
    return parser


def _print_results(path: Path, fmt: str) -> int:
    from nemo_lossfree.apps.demo.pareto import describe
    from nemo_lossfree.apps.demo.results import format_markdown, format_table

    try:
        results = json.loads(path.read_text())
        arms = results["arms"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"nemo-lossfree report: RUN_DIR: cannot read {str(path)!r} ({exc})", file=sys.stderr)
        return EXIT_USAGE
    if not isinstance(arms, dict) or not arms:
        print(f"nemo-lossfree report: RUN_DIR: {str(path)!r} has no arms", file=sys.stderr)
        return EXIT_USAGE
    if fmt == "json":
        print(json.dumps(results, indent=2))
    elif fmt == "markdown":
        print(format_markdown(results))
    else:
        print(format_table(results))
        if "pareto" in results:
            print(describe(results["pareto"]))
    return 0


def render_figures(run_dir: Path, out: Path) -> list[Path]:
    """``report_<run>.png`` in ``out`` for every event directory under ``run_dir`` with lossfree metrics."""
    from nemo_lossfree.apps.report.events import find_runs, read_run, run_names
    from nemo_lossfree.apps.report.figure import plot_run

    directories = find_runs(run_dir)
    written = []
    for directory, name in zip(directories, run_names(run_dir, directories)):
        run = read_run(directory, name)
        if not run.scalars and not run.loads:
            continue  # another framework's events (e.g. only 'lm loss')
        written.append(plot_run(run, out / f"report_{name}.png"))
    return written


def run(args: argparse.Namespace) -> int:
    from nemo_lossfree.apps.commands import check_output_dir

    path = Path(args.run_dir)
    if path.is_file():
        return _print_results(path, args.format)
    if not path.is_dir():
        print(f"nemo-lossfree report: RUN_DIR: no such file or directory: {str(path)!r}", file=sys.stderr)
        return EXIT_USAGE
    results = path / "results.json"
    has_events = args.plots and any(path.rglob("events.out.tfevents.*"))
    if not results.is_file() and not has_events:
        print(f"nemo-lossfree report: RUN_DIR: {str(path)!r} holds neither a results.json nor TensorBoard "
              "event files", file=sys.stderr)
        return EXIT_USAGE
    code = _print_results(results, args.format) if results.is_file() else 0
    if code or not has_events:
        return code
    try:
        out = check_output_dir(args.out or path, "--out", create=True)
    except ValueError as exc:
        print(f"nemo-lossfree report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    figures = render_figures(path, out)
    if not figures:
        print(f"nemo-lossfree report: RUN_DIR: no lossfree/ metrics in the event files under {str(path)!r}",
              file=sys.stderr)
        return 0 if results.is_file() else 2
    for figure in figures:
        print(f"wrote {figure}", file=sys.stderr)
    return 0
