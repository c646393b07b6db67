"""What a SLURM job runs: the training command built from a run config.

GPU clusters run the NeMo framework (Megatron-Bridge) entry point,
``python -m nemo_lossfree.integrations.bridge.pretrain --config-file FILE [overrides]``,
under torchrun. CPU clusters (``--gpus-per-node 0``) run the demo worker,
``python -m nemo_lossfree.apps.demo.worker --config <job dir>/run_config.yaml``,
with gloo: the run config resolved (file, overrides, the job's layout) and
written next to the script, so the job reads exactly the config that
``validate-config``'s check passed. ``nemo_lossfree.apps.demo.run_config``
decides what the CPU model runs (its arm, its settings) and refuses, before
anything is written, a key it cannot run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Optional

RUN_CONFIG_FILE = "run_config.yaml"


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = config.get(name) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}: must be a mapping (a YAML section), got {type(value).__name__}")
    return value


def cpu_worker_command(config: Mapping[str, Any], *, config_file: str, results_dir: str,
                       checkpoint_dir: str) -> list[str]:
    """``-m nemo_lossfree.apps.demo.worker ... --config FILE`` (arguments after the interpreter).

    ``config`` is the resolved run config the job will find in ``config_file``;
    the demo's reading of it (``from_run_config``) is checked here, so a key
    the CPU model cannot run stops the job before it is written. ``--load``
    always points at the checkpoint directory: the worker resumes when a
    checkpoint is there (a requeued job) and starts fresh otherwise.
    """
    from nemo_lossfree.apps.demo.run_config import arm_of, from_run_config

    arm = arm_of(config)
    from_run_config(config, [arm])
    checkpoint = _section(config, "checkpoint")
    command = [
        "-m", "nemo_lossfree.apps.demo.worker",
        "--arm", arm,
        "--out", results_dir,
        "--save", checkpoint_dir,
        "--load", checkpoint_dir,
        "--progress",
    ]
    if checkpoint.get("save_interval"):
        command += ["--save-interval", str(checkpoint["save_interval"])]
    return command + ["--config", config_file]


def gpu_pretrain_command(config_file: str, overrides: list[str],
                         config: Mapping[str, Any], recipe: Optional[str] = None) -> list[str]:
    """The Bridge entry point's arguments (``integrations.launch.pretrain_args``, shared with NeMo-Run)."""
    from nemo_lossfree.integrations.launch import pretrain_args

    return pretrain_args(config_file, overrides, config, recipe=recipe)


def load_config(path: str, overrides: list[str]) -> dict[str, Any]:
    """The run config as nested dicts, overrides applied (``a.b=value``).

    ``nemo_lossfree.runconfig.load.load_run_config``, the one reader of run-config
    files: its ``RunConfigError`` (a ``ValueError``) names the key, or ``--config`` and the file.
    """
    from nemo_lossfree.runconfig.load import load_run_config

    return load_run_config(path, list(overrides), flag="--config")


def default_python() -> str:
    """The interpreter for CPU jobs on this machine's cluster: the running one (its venv)."""
    return str(Path(sys.executable))
