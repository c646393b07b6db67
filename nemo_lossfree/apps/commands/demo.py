"""``nemo-lossfree demo``: loss-free balancing vs the alternatives, on the CPU.

Trains the same small Megatron-Core GPT-MoE once per arm in two gloo
processes (expert parallel 2) and writes ``results.json``, ``demo.png``,
TensorBoard events and one ``report_<arm>.png`` per arm (the load heatmap
over training, MaxVio, load spread and EP overload) to ``--out``. With ``--seeds A,B,C`` every seed runs in
``<out>/seed_<S>/`` and ``results.json`` holds the means, standard deviations
and per-seed values; the Pareto panel of ``demo.png`` draws the spread as
error bars.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from nemo_lossfree.exit_codes import EXIT_STOPPED, EXIT_USAGE


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers, got {text!r}")
    return seeds


def _seed_path(root: Optional[str], seed: int, n_seeds: int) -> Optional[str]:
    """Where one seed's results or checkpoints go: ``<root>/seed_<S>`` when there are several."""
    if root is None or n_seeds == 1:
        return root
    return str(Path(root) / f"seed_{seed}")


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    from nemo_lossfree.apps.demo.arms import ARMS, DEFAULT_ARMS
    from nemo_lossfree.apps.demo.settings import add_settings_args

    parser = subparsers.add_parser(
        name, help=help_text, description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help=f"comma-separated subset of {', '.join(ARMS)}")
    parser.add_argument("--seeds", type=_seeds, default=None,
                        help="comma-separated seeds, one run each (default: --seed)")
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("--save", default=None, help="checkpoint root (dist_checkpointing)")
    parser.add_argument("--save-interval", type=int, default=None, help="save every K steps")
    parser.add_argument("--load", default=None, help="resume from this checkpoint root")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_settings_args(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from nemo_lossfree.apps.commands import check_output_dir
    from nemo_lossfree.apps.commands.report import render_figures
    from nemo_lossfree.apps.demo.arms import parse_arms
    from nemo_lossfree.apps.demo.launcher import WORLD_SIZE, launch
    from nemo_lossfree.apps.demo.pareto import describe
    from nemo_lossfree.apps.demo.plots import plot_demo
    from nemo_lossfree.apps.demo.results import collect, combine_seeds, format_table, write_json
    from nemo_lossfree.apps.demo.run_config import to_run_config
    from nemo_lossfree.apps.demo.settings import check_run, settings_from_args
    from nemo_lossfree.runconfig.load import save_run_config

    out = Path(args.out)
    try:
        arms = parse_arms(args.arms)
        settings = settings_from_args(args)
        seeds = args.seeds or [settings.seed]
        # Every seed's run is checked before the first one starts: a bad flag
        # must not surface after an hour of training the seeds before it.
        runs = []
        for seed in seeds:
            seed_settings = dataclasses.replace(settings, seed=seed)
            seed_out, save, load = (_seed_path(path, seed, len(seeds)) for path in (args.out, args.save, args.load))
            check_run(seed_settings, arms, out=seed_out, save=save, save_interval=args.save_interval,
                      load=load, threads=args.threads)
            runs.append((seed, seed_settings, Path(seed_out), save, load))
        # Probed without creating anything, so a refused run leaves no trace;
        # otherwise an unwritable path is a traceback, or for --save a failure
        # of both workers after the first interval.
        for flag, path in (("--out", args.out), ("--save", args.save)):
            if path is not None:
                check_output_dir(path, flag, create=False)
    except ValueError as exc:
        print(f"nemo-lossfree demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    per_seed = {}
    for seed, seed_settings, seed_out, save, load in runs:
        seed_out.mkdir(parents=True, exist_ok=True)
        # The workers read the settings as a run config: the file is what trained.
        run_config = seed_out / "run_config.yaml"
        save_run_config(to_run_config(seed_settings, world_size=WORLD_SIZE), run_config)
        worker_argv = ["--arm", ",".join(arms), "--out", str(seed_out), "--config", str(run_config)]
        for flag, value in (("--save", save), ("--save-interval", args.save_interval), ("--load", load)):
            if value is not None:
                worker_argv += [flag, str(value)]
        code = launch(worker_argv, seed_out, quiet=args.quiet, threads=args.threads)
        if code == EXIT_STOPPED:
            print(f"stopped early; resume with --load {args.save}" if args.save else "stopped early",
                  file=sys.stderr)
            return code
        if code != 0:
            return code
        config = seed_settings.to_dict()
        config.update(arms=arms, world_size=2, expert_model_parallel_size=2,
                      tokens_per_step=settings.tokens_per_step)
        per_seed[seed] = collect(seed_out, arms, config)
        render_figures(seed_out, seed_out)
        if len(seeds) > 1:
            write_json(seed_out / "results.json", per_seed[seed])
    results = per_seed[seeds[0]] if len(seeds) == 1 else combine_seeds(per_seed)
    results["config"]["total_wall_s"] = time.perf_counter() - start
    write_json(out / "results.json", results)
    plot_demo(results, {seed: seed_out for seed, _, seed_out, _, _ in runs}, out / "demo.png")
    print(format_table(results))
    print(describe(results["pareto"]))
    print(f"\nresults: {out / 'results.json'}  plot: {out / 'demo.png'}  load heatmaps: "
          f"{runs[0][2] / 'report_<arm>.png'}  tensorboard: {out / 'tensorboard'}  "
          f"({results['config']['total_wall_s']:.0f} s)")
    return 0
