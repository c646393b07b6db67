"""Render examples/slurm/<config>.sbatch for every config in configs/ (`make slurm-examples`).

GPU configs get the job `nemo-lossfree slurm --config configs/<name>.yaml`
renders for their own ``cluster:`` layout, with placeholder account,
partition, time and container image to edit; CPU configs get the job for the
local cluster (examples/slurm/local_cluster.sh), with paths relative to the
repository root. Submit from the repository root: `mkdir -p logs && sbatch
examples/slurm/<name>.sbatch`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from nemo_lossfree.apps.slurm import payload
from nemo_lossfree.apps.slurm.job import SlurmJob
from nemo_lossfree.apps.slurm.render import render_sbatch

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# Placeholders a cluster user replaces (they are valid values, so the script runs as is on
# a cluster that has them).
GPU_SITE = dict(account="my_account", partition="batch", time="04:00:00",
                container_image="nvcr.io#nvidia/nemo:TAG", container_mounts="/lustre:/lustre")


def paired_recipe(config_path: Path) -> str:
    """The Bridge recipe a config's header pairs it with (``--recipe NAME`` in its comments).

    Configs that name none get the placeholder RECIPE_NAME: replace it with
    the Megatron-Bridge recipe the config completes.
    """
    match = re.search(r"^#.*--recipe (\S+)", config_path.read_text(), re.M)
    return match.group(1) if match else "RECIPE_NAME"


def job_for(config_path: Path) -> SlurmJob:
    rel = config_path.relative_to(REPO).as_posix()
    config = payload.load_config(str(config_path), [])
    cluster = config.get("cluster") or {}
    nodes = cluster.get("nodes") or 1
    gpus = cluster.get("gpus_per_node") or 0
    name = config_path.stem
    if gpus:
        command = payload.gpu_pretrain_command(rel, [], config, recipe=paired_recipe(config_path))
        return SlurmJob(command=command, nodes=nodes, gpus_per_node=gpus, job_name=name,
                        log_dir="logs", **GPU_SITE)
    tasks = cluster.get("tasks_per_node") or 2
    run_dir = f"runs/slurm/{name}"
    # The config laid out for this job already: the worker reads the file itself.
    command = payload.cpu_worker_command(config, config_file=rel, results_dir=f"{run_dir}/results",
                                         checkpoint_dir=f"{run_dir}/checkpoints")
    return SlurmJob(command=command, nodes=nodes, gpus_per_node=0, ntasks_per_node=tasks,
                    job_name=name, log_dir="logs", python=".venv/bin/python", signal_seconds=60)


def main() -> int:
    configs = sorted((REPO / "configs").glob("*.yaml"))
    if not configs:
        print("no configs/*.yaml to render", file=sys.stderr)
        return 1
    for config_path in configs:
        job = job_for(config_path)
        out = HERE / f"{config_path.stem}.sbatch"
        rel = config_path.relative_to(REPO).as_posix()
        out.write_text(render_sbatch(job, title=f"job for {rel}",
                                     submit_hint=("Submit from the repository root: "
                                                  f"mkdir -p logs && sbatch examples/slurm/{out.name}")))
        out.chmod(0o755)
        print(f"{out.relative_to(REPO)}: {job.nodes} node(s) x {job.procs_per_node} rank(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
