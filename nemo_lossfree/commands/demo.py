"""``nemo-lossfree demo``: loss-free balancing vs the alternatives, on the CPU.

Trains the same small Megatron-Core GPT-MoE once per arm in two gloo
processes (expert parallel 2) and writes ``results.json``, ``demo.png`` and
TensorBoard events to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_ARMS = "loss_free,aux_loss,megatron_bias,none"


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    from nemo_lossfree.demo.settings import add_settings_args

    parser = subparsers.add_parser(
        name, help=help_text, description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--arms", default=DEFAULT_ARMS,
                        help="comma-separated subset of loss_free, aux_loss, megatron_bias, none")
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("--save", default=None, help="checkpoint root (dist_checkpointing)")
    parser.add_argument("--save-interval", type=int, default=None, help="save every K steps")
    parser.add_argument("--load", default=None, help="resume from this checkpoint root")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_settings_args(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from nemo_lossfree.demo.arms import parse_arms
    from nemo_lossfree.demo.launcher import launch
    from nemo_lossfree.demo.plots import plot_arms
    from nemo_lossfree.demo.results import collect, format_table, write_json
    from nemo_lossfree.demo.settings import settings_from_args, settings_to_argv
    from nemo_lossfree.demo.worker import EXIT_STOPPED

    try:
        arms = parse_arms(args.arms)
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"nemo-lossfree demo: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    worker_argv = ["--arm", ",".join(arms), "--out", str(out), *settings_to_argv(settings)]
    for flag, value in (("--save", args.save), ("--save-interval", args.save_interval),
                        ("--load", args.load)):
        if value is not None:
            worker_argv += [flag, str(value)]
    start = time.perf_counter()
    code = launch(worker_argv, out, quiet=args.quiet, threads=args.threads)
    if code == EXIT_STOPPED:
        print(f"stopped early; resume with --load {args.save}" if args.save else "stopped early",
              file=sys.stderr)
        return code
    if code != 0:
        return code
    config = settings.to_dict()
    config["arms"] = arms
    config["world_size"] = 2
    config["expert_model_parallel_size"] = 2
    config["tokens_per_step"] = settings.tokens_per_step
    config["total_wall_s"] = time.perf_counter() - start
    results = collect(out, arms, config)
    write_json(out / "results.json", results)
    plot_arms(out, arms, out / "demo.png")
    print(format_table(results))
    print(f"\nresults: {out / 'results.json'}  plot: {out / 'demo.png'}  "
          f"tensorboard: {out / 'tensorboard'}  ({config['total_wall_s']:.0f} s)")
    return 0
