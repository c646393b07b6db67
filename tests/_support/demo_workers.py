"""Shared by the demo, resume and crash-safety tests: tiny settings, a two-rank worker launch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

# A model small enough that a step takes milliseconds; the corpus is capped so
# start-up reads little. Everything else is the demo's code path.
TINY = ["--layers", "2", "--hidden-size", "32", "--heads", "2", "--moe-ffn-hidden-size", "16",
        "--experts", "4", "--topk", "2", "--seq-length", "32", "--micro-batch-size", "2",
        "--num-micro-batches", "2", "--val-windows", "8", "--lr-warmup-steps", "2",
        "--corpus-max-bytes", "1000000"]


def run_workers(argv: list[str], *, on_event: Optional[Callable[[dict, list], None]] = None,
                timeout: float = 900) -> tuple[int, int, list[dict]]:
    """Start ranks 0 and 1 of the worker; returns (rc0, rc1, rank 0's progress events)."""
    from nemo_lossfree.apps.demo.worker import PROGRESS_PREFIX
    from nemo_lossfree.testing.distributed import free_port

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "nemo_lossfree.apps.demo.worker", *argv, "--progress"]
    procs = [
        subprocess.Popen(command, env=dict(env, RANK=str(rank)), text=True,
                         stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
        for rank in range(2)
    ]
    events = []
    try:
        for line in procs[0].stdout:
            if line.startswith(PROGRESS_PREFIX):
                event = json.loads(line[len(PROGRESS_PREFIX):])
                events.append(event)
                if on_event is not None:
                    on_event(event, procs)
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if codes != [0, 0] and codes != [75, 75]:
        errors = "\n".join(p.stderr.read()[-3000:] for p in procs)
        raise AssertionError(f"workers exited with {codes}:\n{errors}")
    for p in procs:
        p.stderr.close()
    return codes[0], codes[1], events


def run_workers_to_exit(argv: list[str], *, timeout: float = 600) -> tuple[list[int], list[str]]:
    """Start ranks 0 and 1 of the worker and wait, whatever they exit with: (codes, stderr per rank)."""
    from nemo_lossfree.testing.distributed import free_port

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "nemo_lossfree.apps.demo.worker", *argv]
    procs = [
        subprocess.Popen(command, env=dict(env, RANK=str(rank)), text=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for rank in range(2)
    ]
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], errs


def send_usr1(procs) -> None:
    for p in procs:
        p.send_signal(signal.SIGUSR1)


def arm_json(out: Path, arm: str) -> dict:
    return json.loads((out / f"{arm}.json").read_text())
