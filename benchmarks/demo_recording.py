"""Run a recording benchmark's own script as the demo's worker on local ranks.

``replay_rules.py`` and ``demo_bias_headroom.py`` both wrap the demo worker to
record router scores; each starts itself once per rank with the scores'
output directory in an environment variable the worker side reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_recording_workers(script: str, out_env: str, out: Path, world: int, port: int,
                          demo_flags: list[str]) -> int:
    """``script`` as the ``loss_free`` demo worker on ``world`` local ranks; 0, or 1 after a failed rank."""
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), **{out_env: str(out)})
        with open(out / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, script, "--arm", "loss_free", "--out", str(out), *demo_flags],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            ))
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"worker exit codes {codes}; see {out}/rank*.log", file=sys.stderr)
        return 1
    return 0
