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
  The world size must be a multiple of the expert-parallel size (2).

Flags:
  --arm ARM[,ARM...]    loss_free, aux_loss, megatron_bias, none (comma list: run in order)
  --steps N             training steps per arm
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
  --master-addr/--master-port, --expert-parallel (default 2), --progress
  and the model/training flags of nemo_lossfree.apps.demo.settings (--experts, --topk,
  --layers, --hidden-size, --seq-length, --lr, --corpus, --lossfree KEY=VALUE, ...).

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
    parser.add_argument("--expert-parallel", type=int, default=2)
    parser.add_argument("--progress", action="store_true",
                        help=f"rank 0 prints one '{PROGRESS_PREFIX.strip()} <json>' line per step")
    add_settings_args(parser)
    return parser


def distributed_env(args: argparse.Namespace) -> tuple[int, int, str]:
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
    if world % args.expert_parallel:
        raise ValueError(
            f"world size: must be a multiple of --expert-parallel ({args.expert_parallel}), got {world}"
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


def train_arms(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from nemo_lossfree.apps.demo import checkpoint
    from nemo_lossfree.apps.demo.arms import parse_arms
    from nemo_lossfree.apps.demo.corpus import load_corpus
    from nemo_lossfree.apps.demo.results import ArmReporter
    from nemo_lossfree.apps.demo.settings import finished_arm, settings_from_args
    from nemo_lossfree.apps.demo.trainer import ArmTrainer, run_arm

    settings = settings_from_args(args)
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from nemo_lossfree.apps.demo.arms import parse_arms
        from nemo_lossfree.apps.demo.settings import check_run, settings_from_args

        settings = settings_from_args(args)
        check_run(settings, parse_arms(args.arm), out=args.out, save=args.save,
                  save_interval=args.save_interval, load=args.load)
        rank, world, init_method = distributed_env(args)
    except ValueError as exc:
        print(f"nemo_lossfree.apps.demo.worker: {exc}", file=sys.stderr)
        return EXIT_USAGE

    # CPU mode first: it must run before Megatron-Core's router module is imported.
    from nemo_lossfree.testing import cpu

    cpu.enable()
    import torch

    torch.set_num_threads(int(os.environ.get("NEMO_LOSSFREE_THREADS", "1")))
    cpu.init_distributed(rank, world, init_method=init_method,
                         expert_model_parallel_size=args.expert_parallel, seed=args.seed)
    import torch.distributed as dist

    from nemo_lossfree.apps.demo.checkpoint import CheckpointError

    try:
        return train_arms(args)
    except CheckpointError as exc:
        print(f"nemo_lossfree.apps.demo.worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
