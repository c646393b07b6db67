"""SlurmJob: everything an sbatch script needs to know, validated in one place.

The fields are the ``nemo-lossfree slurm`` flags; ``render.render_sbatch(job)``
turns a job into a script. Validation happens here, so a bad value is reported
with its flag name before anything is written or submitted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

LAUNCHERS = ("torchrun", "srun")

_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# SLURM time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


def _positive(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")


@dataclass
class SlurmJob:
    """One SLURM training job.

    ``command`` is the training program and its flags, run once per rank.
    Launcher "srun": SLURM starts every rank itself (``procs_per_node`` tasks
    per node; ranks read SLURM_PROCID/SLURM_NTASKS). Launcher "torchrun": one
    task per node runs torchrun, which starts ``procs_per_node`` ranks (one
    per GPU, or ``ntasks_per_node`` on CPUs) and rendezvouses on the job's
    head node.
    """

    command: list[str]
    nodes: int = 1
    gpus_per_node: int = 0
    ntasks_per_node: Optional[int] = None
    launcher: Optional[str] = None
    job_name: str = "nemo-lossfree"
    account: Optional[str] = None
    partition: Optional[str] = None
    time: Optional[str] = None
    container_image: Optional[str] = None
    container_mounts: Optional[str] = None
    #: Where logs go (``<log_dir>/%x-%j.out``); relative paths are relative to
    #: the submission directory, as SLURM reads them.
    log_dir: str = "logs"
    #: ``#SBATCH --chdir``; None: the directory sbatch is run from.
    workdir: Optional[str] = None
    #: Seconds before the time limit at which SLURM sends USR1 to the batch
    #: shell, which asks the training to checkpoint and stop.
    signal_seconds: int = 300
    requeue: bool = True
    #: A job that stops again and again without finishing is a crash loop, not
    #: preemption: stop requeueing after this many restarts.
    max_requeues: int = 20
    master_port: int = 29500
    exclusive: bool = True
    #: The interpreter on the compute nodes ("python" inside a container).
    python: str = "python"
    #: Extra ``export NAME=value`` lines, after the defaults.
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.command or not all(isinstance(a, str) and a for a in self.command):
            raise ValueError(f"command: must be a non-empty list of non-empty strings, got {self.command!r}")
        _positive("--nodes", self.nodes)
        _positive("--gpus-per-node", self.gpus_per_node, minimum=0)
        if self.launcher is None:
            # GPUs: one torchrun per node (Megatron's usual layout), unless one
            # task per GPU was asked for. CPUs: one srun task per gloo rank.
            one_task_per_gpu = self.gpus_per_node > 0 and (self.ntasks_per_node or 1) > 1
            self.launcher = "torchrun" if self.gpus_per_node > 0 and not one_task_per_gpu else "srun"
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"--launcher: must be one of {', '.join(LAUNCHERS)}; got {self.launcher!r}")
        if self.ntasks_per_node is None:
            self.ntasks_per_node = self.gpus_per_node or 1
        _positive("--ntasks-per-node", self.ntasks_per_node)
        if self.gpus_per_node and self.ntasks_per_node not in (1, self.gpus_per_node):
            raise ValueError(
                f"--ntasks-per-node: with GPUs it must be 1 (torchrun per node) or --gpus-per-node "
                f"({self.gpus_per_node}, one rank per GPU), got {self.ntasks_per_node}"
            )
        if not _JOB_NAME.match(self.job_name):
            raise ValueError(
                f"--job-name: must be letters, digits, '_', '.', '-' (starting with a letter or digit), "
                f"got {self.job_name!r}"
            )
        if self.time is not None and not _TIME.match(self.time):
            raise ValueError(
                f"--time: must be a SLURM time (MM, HH:MM:SS, D-HH:MM:SS, ...), got {self.time!r}"
            )
        for name, value in (("--account", self.account), ("--partition", self.partition)):
            if value is not None and (not value or any(c.isspace() for c in value)):
                raise ValueError(f"{name}: must be a non-empty word without spaces, got {value!r}")
        if self.container_mounts and not self.container_image:
            raise ValueError("--container-mounts: needs --container-image (pyxis mounts into the container)")
        _positive("--signal-seconds", self.signal_seconds)
        _positive("--max-requeues", self.max_requeues, minimum=0)
        _positive("--master-port", self.master_port, minimum=1024)
        if self.master_port > 65535:
            raise ValueError(f"--master-port: must be <= 65535, got {self.master_port}")

    @property
    def procs_per_node(self) -> int:
        """Training ranks on each node (torchrun's --nproc-per-node)."""
        if self.gpus_per_node:
            return self.gpus_per_node
        return self.ntasks_per_node

    @property
    def slurm_tasks_per_node(self) -> int:
        """``#SBATCH --ntasks-per-node``: torchrun is one task that starts the ranks."""
        return 1 if self.launcher == "torchrun" else self.procs_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node
