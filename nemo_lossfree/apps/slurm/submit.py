"""Submit an sbatch script and (optionally) wait for the job to end.

Waiting polls ``scontrol show job`` instead of using ``sbatch --wait``: a job
that requeues itself after preemption goes RUNNING -> REQUEUED -> PENDING ->
RUNNING under the same id, and only a terminal state (COMPLETED, FAILED, ...)
ends the wait.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Optional

# JobState values after which the job will not run again.
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT",
})


class SlurmError(RuntimeError):
    """A SLURM command failed or reported something unexpected."""


@dataclass
class JobInfo:
    job_id: str
    state: str
    exit_code: int
    restarts: int
    fields: dict[str, str]


def _run(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"{argv[0]}: not found (is SLURM installed, and SLURM_CONF set for a local cluster?)")
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SlurmError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def submit(script_path: str) -> str:
    """``sbatch --parsable SCRIPT``; returns the job id."""
    out = _run(["sbatch", "--parsable", script_path]).strip()
    job_id = out.split(";")[0]  # "<id>[;<cluster>]"
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed {out!r}, expected a job id")
    return job_id


def parse_show_job(text: str) -> dict[str, str]:
    """``scontrol show job -o`` output (one line of key=value words) as a dict."""
    fields: dict[str, str] = {}
    for word in text.split():
        if "=" in word:
            key, value = word.split("=", 1)
            fields.setdefault(key, value)
    return fields


def job_info(job_id: str) -> JobInfo:
    fields = parse_show_job(_run(["scontrol", "show", "job", "-o", job_id]))
    if "JobState" not in fields:
        raise SlurmError(f"scontrol show job {job_id}: no JobState in its output")
    # ExitCode=<status>:<signal>
    status, _, signal = fields.get("ExitCode", "0:0").partition(":")
    exit_code = int(status) if status.isdigit() else -1
    if signal.isdigit() and int(signal):
        exit_code = 128 + int(signal)
    return JobInfo(job_id, fields["JobState"], exit_code, int(fields.get("Restarts", "0") or 0), fields)


def wait(job_id: str, *, poll_s: float = 2.0, timeout_s: Optional[float] = None,
         on_change: Optional[Callable[[JobInfo], None]] = None) -> JobInfo:
    """Poll until the job reaches a terminal state; returns its last info."""
    start = time.monotonic()
    last: Optional[tuple[str, int]] = None
    while True:
        info = job_info(job_id)
        if on_change is not None and (info.state, info.restarts) != last:
            on_change(info)
        last = (info.state, info.restarts)
        if info.state in TERMINAL_STATES:
            return info
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise SlurmError(f"job {job_id}: still {info.state} after {timeout_s:.0f} s")
        time.sleep(poll_s)
