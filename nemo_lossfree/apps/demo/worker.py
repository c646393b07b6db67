"""One process of the demo: trains the chosen arms, one after the other.

Launch it with 2 processes (expert parallel 2, allgather dispatcher, gloo):

    torchrun --nproc-per-node 2 -m nemo_lossfree.apps.demo.worker --arm loss_free --steps 200 --out runs/demo
    srun -n 2 python -m nemo_lossfree.apps.demo.worker --arm loss_free --steps 200 --out runs/demo \
        --master-addr $(hostname) --master-port 29500

``nemo-lossfree demo`` starts two of them itself (``nemo_lossfree.apps.demo.launcher``).

Process group, from the environment:
  torchrun: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
  srun:     SLURM_PROCID, SLURM_NTASKS, and the master from --master-addr /
            --master-port, else MASTER_ADDR / MASTER_PORT, else
            SLURM_LAUNCH_NODE_IPADDR and port 29500.
  The world size must be a multiple of the expert-parallel size (default 2).

Flags:
  --arm ARM[,ARM...]    loss_free, aux_loss, megatron_bias, none (comma list: run in order)
  --out DIR             results: <DIR>/<arm>.json (final per-layer biases, metrics,
                        per-step history) and <DIR>/tensorboard/<arm>/ (rank 0 writes)
  --save DIR            checkpoint root: <DIR>/<arm>/iter_<step>/ and <DIR>/<arm>/latest
                        (megatron.core.dist_checkpointing: model incl. expert_bias,
                        optimizer, balancer state, data position, RNG states)
  --save-interval K     also save every K steps (with --save)
  --load DIR            resume each arm from <DIR>/<arm>/latest when it exists; arms
                        whose <out>/<arm>.json is complete are skipped (refused when
                        it records other settings). DIR must exist unless it is the
                        --save directory (a first run that resumes when requeued)
  --exit-after-steps K  save (with --save) and stop after step K, as on SIGUSR1
  --master-addr/--master-port, --progress

What to train, one of:
  --config FILE [KEY=VALUE ...]
                        a run config (configs/*.yaml; what `nemo-lossfree demo` and
                        `nemo-lossfree slurm` hand the worker), read and checked as
                        `nemo-lossfree validate-config` does, then turned into the
                        demo's settings by nemo_lossfree.apps.demo.run_config (a key
                        the CPU model cannot run is refused, naming it). KEY=VALUE
                        overrides alone (no FILE) start from the demo's defaults.
  the flags of `nemo-lossfree demo` (nemo_lossfree.apps.demo.settings: --steps,
                        --experts, --topk, --layers, --lossfree KEY=VALUE, ...) and
                        --expert-parallel (default 2).

Signals: on SIGUSR1 (or SIGTERM) the current step finishes, every rank agrees
to stop, the checkpoint is saved when --save is given, and the process exits
with EXIT_STOPPED. A SLURM job can request it with ``--signal=B:USR1@120`` and
requeue; the next run with ``--load`` continues exactly where it stopped.

Exit codes:
  0   every arm finished; results written
  1   failure (exception)
  2   bad flags or environment (one line per rank, before joining the process group)
  75  stopped early (SIGUSR1/SIGTERM or --exit-after-steps); checkpoint saved if --save
      was given: rerun with --load to continue (EX_TEMPFAIL: "try again")
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

from nemo_lossfree.apps.demo.protocol import PROGRESS_PREFIX
from nemo_lossfree.apps.demo.settings import SETTINGS_GROUP, DemoSettings
from nemo_lossfree.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_STOPPED, EXIT_USAGE  # noqa: F401 (re-exported)

DEFAULT_PORT = 29500


def build_parser() -> argparse.ArgumentParser:
    from nemo_lossfree.apps.demo.settings import add_settings_args

    parser = argparse.ArgumentParser(
        prog="python -m nemo_lossfree.apps.demo.worker",
        description="One rank of the nemo-lossfree demo (see the module docstring).",
    )
    parser.add_argument("--arm", required=True, help="arm or comma-separated arms")
    parser.add_argument("--out", required=True, help="results directory")
    parser.add_argument("--save", default=None, help="checkpoint root directory")
    parser.add_argument("--save-interval", type=int, default=None, help="save every K steps")
    parser.add_argument("--load", default=None, help="checkpoint root to resume from")
    parser.add_argument("--exit-after-steps", type=int, default=None,
                        help="stop (and save) after this step, as on SIGUSR1")
    parser.add_argument("--master-addr", default=None)
    parser.add_argument("--master-port", type=int, default=None)
    parser.add_argument("--progress", action="store_true",
                        help=f"rank 0 prints one '{PROGRESS_PREFIX.strip()} <json>' line per step")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="run config (YAML) to train; instead of the model and training flags")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="run-config overrides (with or without --config)")
    flags = add_settings_args(parser)
    flags.add_argument("--expert-parallel", type=int, default=2)
    return parser


def _flags_given(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The model/training flags present in ``argv`` (they and a run config exclude each other)."""
    group = next(g for g in parser._action_groups if g.title == SETTINGS_GROUP)
    options = {o for action in group._group_actions for o in action.option_strings}
    return [a.split("=")[0] for a in argv if a.split("=")[0] in options]


def environment_world_size() -> int:
    env = os.environ
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if key in env:
            return int(env[key])
    raise ValueError(
        "environment: set RANK and WORLD_SIZE (torchrun) or SLURM_PROCID and SLURM_NTASKS (srun)"
    )


def settings_of(parser: argparse.ArgumentParser, args: argparse.Namespace,
                argv: list[str]) -> tuple[DemoSettings, int]:
    """``(settings, expert_model_parallel_size)`` from the run config or from the flags."""
    from nemo_lossfree.apps.demo.arms import parse_arms
    from nemo_lossfree.apps.demo.run_config import from_run_config, world_size_of
    from nemo_lossfree.apps.demo.settings import settings_from_args

    if args.config is None and not args.overrides:
        return settings_from_args(args), args.expert_parallel
    given = _flags_given(parser, argv)
    if given:
        raise ValueError(f"{given[0]}: the run config sets the model and training; give it as an override "
                         "(KEY=VALUE) or drop --config")
    from nemo_lossfree.runconfig.load import load_run_config
    from nemo_lossfree.runconfig.validate import check

    config = load_run_config(args.config, args.overrides, flag="--config")  # a ValueError names the key
    world = environment_world_size()
    config.setdefault("cluster", {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": world})
    if world_size_of(config) not in (None, world):
        raise ValueError(f"cluster: laid out for {world_size_of(config)} ranks (nodes x tasks_per_node), "
                         f"this worker runs in a world of {world}")
    problems, _warnings, _facts = check(config)
    if problems:
        raise ValueError("\n".join(problems))
    return from_run_config(config, parse_arms(args.arm))


def distributed_env(args: argparse.Namespace, expert_parallel: int) -> tuple[int, int, str]:
    """(rank, world_size, init_method) from torchrun's or srun's environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    else:
        raise ValueError(
            "environment: set RANK and WORLD_SIZE (torchrun) or SLURM_PROCID and SLURM_NTASKS (srun)"
        )
    addr = args.master_addr or env.get("MASTER_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR")
    if not addr:
        raise ValueError("master address: pass --master-addr or set MASTER_ADDR")
    port = args.master_port or int(env.get("MASTER_PORT", DEFAULT_PORT))
    if world % expert_parallel:
        raise ValueError(
            f"world size: must be a multiple of the expert-parallel size ({expert_parallel}), got {world}"
        )
    return rank, world, f"tcp://{addr}:{port}"


class StopFlag:
    """Set by SIGUSR1/SIGTERM; ranks agree on it with one tiny all-reduce per step."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def train_arms(args: argparse.Namespace, settings: DemoSettings) -> int:
    import torch.distributed as dist

    from nemo_lossfree.apps.demo import checkpoint
    from nemo_lossfree.apps.demo.arms import parse_arms
    from nemo_lossfree.apps.demo.corpus import load_corpus
    from nemo_lossfree.apps.demo.results import ArmReporter
    from nemo_lossfree.apps.demo.settings import finished_arm
    from nemo_lossfree.apps.demo.trainer import ArmTrainer, run_arm

    arms = parse_arms(args.arm)
    out = Path(args.out)
    rank = dist.get_rank()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(settings.corpus, max_bytes=settings.corpus_max_bytes,
                         tokenizer=settings.tokenizer, vocab_size=settings.vocab_size)
    stop = StopFlag()
    for arm in arms:
        if args.load and finished_arm(out, arm) is not None:
            continue  # of the same settings: main's check_run refused any other
        start = time.perf_counter()
        trainer = ArmTrainer(arm, settings, corpus)
        resumed_from: Optional[str] = None
        if args.load:
            directory = checkpoint.latest(args.load, arm)
            if directory is not None:
                checkpoint.load(trainer, directory)
                resumed_from = str(directory)
        reporter = ArmReporter(out, trainer, write=(rank == 0), progress=args.progress and rank == 0)
        reporter.started(resumed_from)
        save = (lambda: checkpoint.save(trainer, args.save)) if args.save else None  # noqa: B023 (this arm's)
        finished = run_arm(
            trainer,
            stop_requested=stop.agreed,
            on_step=reporter.step,
            save=save,
            save_interval=args.save_interval,
            exit_after_steps=args.exit_after_steps,
        )
        if not finished:
            reporter.stopped()
            return EXIT_STOPPED
        evaluation = trainer.evaluate()
        reporter.finished(evaluation, wall_s=time.perf_counter() - start)
        dist.barrier()
    return EXIT_OK


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    # CPU mode first: it must run before Megatron-Core's router module is imported,
    # and checking the run config imports it (TransformerConfig's module does).
    # Quietly: Megatron's import warnings must not bury a bad flag's one line.
    from nemo_lossfree.integrations import cpu
    from nemo_lossfree.runconfig.megatron_fields import quiet

    with quiet():
        cpu.enable()
    try:
        from nemo_lossfree.apps.demo.arms import parse_arms
        from nemo_lossfree.apps.demo.settings import check_run

        settings, expert_parallel = settings_of(parser, args, argv)
        check_run(settings, parse_arms(args.arm), out=args.out, save=args.save,
                  save_interval=args.save_interval, load=args.load)
        rank, world, init_method = distributed_env(args, expert_parallel)
    except ValueError as exc:
        for line in str(exc).splitlines():
            print(f"nemo_lossfree.apps.demo.worker: {line}", file=sys.stderr)
        return EXIT_USAGE

    import torch

    torch.set_num_threads(int(os.environ.get("NEMO_LOSSFREE_THREADS", "1")))
    cpu.init_distributed(rank, world, init_method=init_method,
                         expert_model_parallel_size=expert_parallel, seed=settings.seed)
    import torch.distributed as dist

    from nemo_lossfree.apps.demo.checkpoint import CheckpointError

    try:
        return train_arms(args, settings)
    except CheckpointError as exc:
        print(f"nemo_lossfree.apps.demo.worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
