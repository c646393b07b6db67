"""Start the demo's two worker processes on this machine and follow their progress.

The workers are ``python -m nemo_lossfree.apps.demo.worker`` (the same entry point
torchrun or srun would start) with RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT set; rank 0 prints one progress line per step, shown here as a
progress bar per arm. Their other output goes to ``<out>/logs/rank<r>.log``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from nemo_lossfree.apps.demo.protocol import progress_event
from nemo_lossfree.exit_codes import EXIT_STOPPED
from nemo_lossfree.integrations.launch import free_port

WORLD_SIZE = 2


# A free port is only free until someone binds it: two demos started at the
# same moment can draw the same one, and rank 0's store then fails to listen.
PORT_ATTEMPTS = 3
FAILED_PEER_GRACE_S = 30
_PORT_TAKEN = "EADDRINUSE"


class _Bars:
    """One tqdm bar per arm (plain lines when tqdm is missing or output is not a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is in the dev extra
            tqdm = None
        self._tqdm = tqdm

    def handle(self, event: dict) -> None:
        if self.quiet:
            return
        kind, arm = event["event"], event["arm"]
        if kind == "start":
            if self._tqdm is not None:
                self.bar = self._tqdm(total=event["steps"], initial=event["step"], desc=f"{arm:>13}",
                                      unit="step", dynamic_ncols=True, file=sys.stderr)
            else:
                print(f"{arm}: starting at step {event['step']}/{event['steps']}", file=sys.stderr)
        elif kind == "step":
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{event['loss']:.3f}", maxvio=f"{event['maxvio_batch']:.2f}")
            elif event["step"] % 20 == 0 or event["step"] == event["steps"]:
                print(f"{arm}: step {event['step']}/{event['steps']} loss {event['loss']:.3f} "
                      f"MaxVio_batch {event['maxvio_batch']:.2f}", file=sys.stderr)
        elif kind in ("finished", "stopped"):
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if kind == "stopped":
                print(f"{arm}: stopped at step {event['step']}", file=sys.stderr)


def _run_workers(command: list[str], base_env: dict, logs: Path, bars: _Bars) -> tuple[list[int], bool]:
    """Start the ranks and wait; returns (exit codes, whether rank 0 found its port taken)."""
    procs = []
    log_files = []
    started = False
    for rank in range(WORLD_SIZE):
        log = open(logs / f"rank{rank}.log", "w")
        log_files.append(log)
        procs.append(subprocess.Popen(
            command, env=dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdout=subprocess.PIPE if rank == 0 else log, stderr=log, text=True,
        ))
    try:
        assert procs[0].stdout is not None
        for line in procs[0].stdout:
            event = progress_event(line)
            if event is not None:
                started = True
                bars.handle(event)
            else:
                log_files[0].write(line)
        if procs[0].wait() not in (0, EXIT_STOPPED):
            # Rank 0 failed: the others cannot go on without its store and
            # collectives. Give them a moment to fail on their own, then stop
            # them rather than wait out their connection timeout (minutes).
            for p in procs[1:]:
                try:
                    p.wait(timeout=FAILED_PEER_GRACE_S)
                except subprocess.TimeoutExpired:
                    p.terminate()
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    finally:
        for log in log_files:
            log.close()
    port_taken = (not started and codes[0] != 0
                  and _PORT_TAKEN in (logs / "rank0.log").read_text(errors="replace"))
    return codes, port_taken


def launch(worker_argv: list[str], out: Path, *, quiet: bool = False,
           env: Optional[dict] = None, threads: int = 1) -> int:
    """Run the workers to completion; returns rank 0's exit code (or the first failure)."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base_env = dict(os.environ if env is None else env)
    base_env.update(WORLD_SIZE=str(WORLD_SIZE), NEMO_LOSSFREE_THREADS=str(threads), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "nemo_lossfree.apps.demo.worker", *worker_argv, "--progress"]
    bars = _Bars(quiet)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        base_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        codes, port_taken = _run_workers(command, base_env, logs, bars)
        if not (port_taken and attempt < PORT_ATTEMPTS):
            break
        print(f"port {port} was taken before rank 0 could listen; retrying with another",
              file=sys.stderr)
    failed = [c for c in codes if c != 0]
    if failed:
        for rank, code in enumerate(codes):
            if code != 0:
                tail = (logs / f"rank{rank}.log").read_text().splitlines()[-25:]
                print(f"worker rank {rank} exited with {code}; last lines of {logs}/rank{rank}.log:",
                      file=sys.stderr)
                print("\n".join(tail), file=sys.stderr)
        return failed[0]
    return 0
