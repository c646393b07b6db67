"""The CPU demo worker as a NeMo-Run task: what a CPU-only SLURM cluster (and CI) runs.

    import nemo_run as run
    from nemo_lossfree.apps.slurm.nemo_run import demo_worker_script
    from nemo_lossfree.integrations import nemo_run as lossfree_run

    launch = lossfree_run.load_config("configs/tiny-cpu.yaml", ["train.train_iters=30"])
    task = demo_worker_script(launch, "runs/nemo-run/tiny")
    executor = lossfree_run.slurm_executor(launch, account="lossfree", packager=run.Packager(),
                                           tunnel=run.LocalTunnel(job_dir=""))
    run.run(task, executor=executor, name="tiny-cpu")

The same job as ``nemo-lossfree slurm --gpus-per-node 0`` runs
(``payload.cpu_worker_command``): the run config resolved with the job's
layout is written to ``<output_dir>/run_config.yaml`` and the worker reads it,
its results go to ``<output_dir>/results/`` and its checkpoints to
``<output_dir>/checkpoints/`` (unless the config's ``checkpoint.save`` names
one), from which a requeued job resumes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Union

from nemo_lossfree.apps.slurm import payload
from nemo_lossfree.integrations.nemo_run import LaunchConfig, module_script
from nemo_lossfree.runconfig.load import save_run_config

if TYPE_CHECKING:  # pragma: no cover
    import nemo_run as run


def demo_worker_script(launch: LaunchConfig, output_dir: Union[str, Path], *,
                       python: str = sys.executable) -> run.Script:
    """``python -m nemo_lossfree.apps.demo.worker ... --config <output_dir>/run_config.yaml``.

    Refuses (``ValueError``, one line) a GPU layout and a config key the CPU
    model cannot run, before anything is written. ``python``: the interpreter
    on the nodes (default: this one, for a cluster sharing this machine's
    file system).
    """
    if launch.gpus_per_node:
        raise ValueError(
            f"cluster.gpus_per_node: the demo worker runs on CPUs (0), got {launch.gpus_per_node}; "
            "GPU jobs run nemo_lossfree.integrations.nemo_run.pretrain_script"
        )
    out = Path(output_dir).resolve()
    checkpoint = (launch.config.get("checkpoint") or {}).get("save") or str(out / "checkpoints")
    config_file = out / payload.RUN_CONFIG_FILE
    args = payload.cpu_worker_command(
        launch.config, config_file=str(config_file), results_dir=str(out / "results"),
        checkpoint_dir=str(Path(checkpoint).resolve()),
    )
    out.mkdir(parents=True, exist_ok=True)
    save_run_config(launch.config, config_file)
    return module_script(args, python=python)
