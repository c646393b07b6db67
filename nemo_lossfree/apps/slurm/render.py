"""Render a SlurmJob into an sbatch script (text), from ``template.SBATCH_TEMPLATE``."""

from __future__ import annotations

import re
import shlex

from nemo_lossfree.apps.slurm.job import SlurmJob
from nemo_lossfree.apps.slurm.template import SBATCH_TEMPLATE
from nemo_lossfree.exit_codes import EXIT_STOPPED
from nemo_lossfree.integrations.launch import TORCHRUN_SIGNALS, job_env

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def _no_spaces(name: str, value: str) -> str:
    if any(c.isspace() for c in value):
        raise ValueError(
            f"{name}: must not contain whitespace (sbatch reads #SBATCH lines word by word), got {value!r}"
        )
    return value


def _sbatch_header(job: SlurmJob) -> str:
    lines = [
        f"#SBATCH --job-name={job.job_name}",
        f"#SBATCH --nodes={job.nodes}",
        f"#SBATCH --ntasks-per-node={job.slurm_tasks_per_node}",
    ]
    if job.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    if job.exclusive:
        lines.append("#SBATCH --exclusive")
    if job.account:
        lines.append(f"#SBATCH --account={job.account}")
    if job.partition:
        lines.append(f"#SBATCH --partition={job.partition}")
    if job.time:
        lines.append(f"#SBATCH --time={job.time}")
    if job.workdir:
        lines.append(f"#SBATCH --chdir={_no_spaces('--workdir', job.workdir)}")
    log_dir = _no_spaces("--output-dir", job.log_dir.rstrip("/") or "/")
    lines += [
        "# One log per job (%x: job name, %j: job id); a requeued job keeps its id",
        "# and appends to the same file.",
        f"#SBATCH --output={log_dir}/%x-%j.out",
        "#SBATCH --open-mode=append",
    ]
    lines.append(f"#SBATCH --signal=B:USR1@{job.signal_seconds}")
    if job.requeue:
        lines.append("#SBATCH --requeue")
    else:
        lines.append("#SBATCH --no-requeue")
    return "\n".join(lines)


def _env_block(job: SlurmJob) -> str:
    out = []
    for name, value, why in job_env(job.gpus_per_node):
        out.append(f"# {why}")
        out.append(f"export {name}={value}")
    for name, value in job.env.items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise ValueError(f"--env: {name!r} is not a valid environment variable name")
        out.append(f"export {name}={shlex.quote(value)}")
    return "\n".join(out)


def _flag_lines(words: list[str]) -> list[str]:
    """Group ``--flag value`` pairs onto one line, so long commands stay readable."""
    lines: list[str] = []
    for word in words:
        if lines and lines[-1].startswith("-") and " " not in lines[-1] and "=" not in lines[-1] \
                and not word.startswith("-"):
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _bash_array(name: str, words: list[str], indent: str = "  ") -> str:
    """A bash array, one flag (with its value) per line."""
    if not words:
        return f"{name}=()"
    body = "\n".join(f"{indent}{w}" for w in _flag_lines(words))
    return f"{name}=(\n{body}\n)"


def _launch_block(job: SlurmJob) -> str:
    srun_args = ["--kill-on-bad-exit=1", "--label"]
    if job.launcher == "torchrun":
        srun_args.insert(0, "--ntasks-per-node=1")
    if job.container_image:
        # pyxis/enroot: the ranks run inside the image.
        srun_args.append(shlex.quote(f"--container-image={job.container_image}"))
        if job.container_mounts:
            srun_args.append(shlex.quote(f"--container-mounts={job.container_mounts}"))
        srun_args.append('--container-workdir="$PWD"')
    program = [shlex.quote(a) for a in job.command]
    out = []
    if job.launcher == "torchrun":
        shutdown = max(job.signal_seconds - 30, 30)
        out += [
            "# torchrun passes USR1 on to its ranks and gives them time to save",
            "# before it kills them.",
            f"export PET_SIGNALS_TO_HANDLE={TORCHRUN_SIGNALS}",
            f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={shutdown}",
            f"# One torchrun per node, {job.procs_per_node} rank(s) each, rendezvous on the head node.",
            _bash_array("srun_args", srun_args),
            _bash_array("launch", [
                shlex.quote(job.python), "-m", "torch.distributed.run",
                '--nnodes="$SLURM_NNODES"',
                f"--nproc-per-node={job.procs_per_node}",
                "--rdzv-backend=c10d",
                '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"',
                '--rdzv-id="$SLURM_JOB_ID"',
                "--max-restarts=0",
            ] + program),
        ]
    else:
        out += [
            f"# One task per rank ({job.procs_per_node} per node); ranks read SLURM_PROCID and",
            "# SLURM_NTASKS, and MASTER_ADDR/MASTER_PORT from above.",
            _bash_array("srun_args", srun_args),
            _bash_array("launch", [shlex.quote(job.python)] + program),
        ]
    return "\n".join(out)


def _requeue_block(job: SlurmJob) -> str:
    if not job.requeue:
        return ("  echo \"stopped with a checkpoint; requeueing is off: resubmit this script to resume\"")
    return "\n".join([
        f"  if [ \"${{SLURM_RESTART_COUNT:-0}}\" -ge {job.max_requeues} ]; then",
        f"    echo \"stopped again after {job.max_requeues} requeues: not requeueing (crash loop?)\"",
        "    exit \"$rc\"",
        "  fi",
        "  echo \"requeueing job $SLURM_JOB_ID: the next run resumes from the checkpoint\"",
        "  scontrol requeue \"$SLURM_JOB_ID\"",
        "  exit 0",
    ])


def _layout(job: SlurmJob) -> str:
    device = "one per GPU (NCCL)" if job.gpus_per_node else "on CPUs (gloo)"
    return (f"{job.nodes} node(s) x {job.procs_per_node} rank(s) = {job.world_size} ranks, {device}; "
            f"launcher {job.launcher}")


def render_sbatch(job: SlurmJob, *, title: str = "nemo-lossfree training job",
                  submit_hint: str = "Submit with: sbatch <this file>") -> str:
    """The sbatch script for ``job``, as text."""
    values = {
        "title": title,
        "submit_hint": submit_hint,
        "layout": _layout(job),
        "sbatch_header": _sbatch_header(job),
        "env_block": _env_block(job),
        "master_port": str(job.master_port),
        "signal_seconds": str(job.signal_seconds),
        "launch_block": _launch_block(job),
        "stopped_exit_code": str(EXIT_STOPPED),
        "requeue_block": _requeue_block(job),
    }

    def fill(match: re.Match) -> str:
        return values[match.group(1)]

    return _PLACEHOLDER.sub(fill, SBATCH_TEMPLATE)
