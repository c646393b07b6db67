"""Launch the lossfree entry point with NeMo-Run (``nemo_run``, tested with 0.11.1).

NeMo-framework users start Megatron-Bridge recipes with NeMo-Run: a task
(``run.Script``) and an executor (``run.SlurmExecutor``), submitted with
``run.run`` or ``run.Experiment``. This module builds both from a run config;
NeMo-Run does everything else (sbatch script, code packaging, containers,
submission, logs, retries)::

    import nemo_run as run
    from nemo_lossfree.integrations import nemo_run as lossfree_run

    launch = lossfree_run.load_config("configs/deepseek-v3-1024gpu.yaml", ["train.train_iters=1000"])
    task = lossfree_run.pretrain_script(launch, recipe="deepseek_v3_pretrain_config")
    executor = lossfree_run.slurm_executor(
        launch, account="my_account", partition="batch", time="04:00:00",
        container_image="nvcr.io/nvidia/nemo:TAG", container_mounts=["/lustre:/lustre"],
        tunnel=run.SSHTunnel(host="login.cluster", user="me", job_dir="/lustre/me/nemo-run"),
    )
    run.run(task, executor=executor, name="dsv3-lossfree")

``load_config`` runs ``nemo-lossfree validate-config``'s check on the config
with the job's layout and raises one ``RunConfigError`` line naming the key,
so a bad config never reaches NeMo-Run, let alone the queue.

What the executor adds to NeMo-Run's defaults: the layout from the config's
``cluster:`` section (GPU jobs: one torchrun per node, ``run.Torchrun()``;
CPU jobs: one srun task per gloo rank), our job environment
(``integrations.launch``), and preemption: ``--signal=USR1@<seconds>`` to the
ranks (torchrun passes it on), which save a checkpoint and exit with 75;
NeMo-Run's script requeues a job that exits non-zero up to ``retries`` times,
and the requeued run resumes (``checkpoint.load``). Unlike ``nemo-lossfree
slurm``, NeMo-Run's script cannot tell a checkpoint-and-stop (75) from a crash:
it requeues both (see docs/nemo_run.md).

``nemo_run`` is imported only by the functions that build its objects, so
this module imports without it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from nemo_lossfree.integrations.launch import TORCHRUN_SIGNALS, job_env, pretrain_args
from nemo_lossfree.runconfig.load import RunConfigError, load_run_config
from nemo_lossfree.runconfig.load import tasks_per_node as _tasks_per_node
from nemo_lossfree.runconfig.validate import check

if TYPE_CHECKING:  # pragma: no cover
    import nemo_run as run

#: The defaults of ``nemo-lossfree slurm`` (``--signal-seconds``, ``--max-requeues``).
DEFAULT_SIGNAL_SECONDS = 300
DEFAULT_RETRIES = 20
#: NeMo-Run's in-container job directory (``nemo_run.config.RUNDIR_NAME``).
_RUNDIR = "/nemo_run"


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """A run config checked for one job: the file, its overrides, the resolved dict.

    ``config["cluster"]`` is the job's layout (the arguments of ``load_config``
    over the file's ``cluster:`` section).
    """

    path: str
    overrides: tuple[str, ...]
    config: dict[str, Any]

    @property
    def nodes(self) -> int:
        return self.config["cluster"]["nodes"]

    @property
    def gpus_per_node(self) -> int:
        return self.config["cluster"]["gpus_per_node"]

    @property
    def tasks_per_node(self) -> int:
        """Ranks per node (one per GPU on GPU jobs)."""
        return self.config["cluster"]["tasks_per_node"]


def load_config(path: str, overrides: Sequence[str] = (), *, nodes: Optional[int] = None,
                gpus_per_node: Optional[int] = None, tasks_per_node: Optional[int] = None) -> LaunchConfig:
    """Read and check a run config for a job; the layout arguments override its ``cluster:`` section.

    Raises ``RunConfigError`` (a ``ValueError``), one line: the file's or an
    override's problem, or the first of the validation problems (with how many
    more there are; ``nemo-lossfree validate-config`` lists them all).
    """
    config = load_run_config(path, list(overrides))
    cluster = dict(config.get("cluster") or {})
    for key, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node)):
        if value is not None:
            cluster[key] = value
    cluster.setdefault("nodes", 1)
    cluster.setdefault("gpus_per_node", 0)
    if gpus_per_node is not None and tasks_per_node is None:
        # The file's tasks per node belong to its own GPU count.
        cluster.pop("tasks_per_node", None)
    if tasks_per_node is not None:
        cluster["tasks_per_node"] = tasks_per_node
    cluster["tasks_per_node"] = _tasks_per_node(cluster)
    config["cluster"] = cluster
    problems, _warnings, _facts = check(config)
    if problems:
        more = (f" (and {len(problems) - 1} more problem(s); `nemo-lossfree validate-config {path}` "
                "lists them)") if len(problems) > 1 else ""
        raise RunConfigError(f"{problems[0]}{more}; nothing submitted")
    return LaunchConfig(str(path), tuple(overrides), config)


def pretrain_script(launch: LaunchConfig, *, recipe: str, python: str = "python") -> run.Script:
    """The NeMo framework entry point as a NeMo-Run task (GPU jobs).

    ``python -m nemo_lossfree.integrations.bridge.pretrain --recipe RECIPE
    --config-file FILE [overrides]``, the command ``nemo-lossfree slurm`` runs:
    the config file's path must be valid on the cluster (a shared file system
    or the container's mounts).
    """
    if not recipe:
        raise ValueError(
            "recipe: the Megatron-Bridge recipe the config completes is required (a name in "
            "megatron.bridge.recipes, e.g. deepseek_v3_pretrain_config, or module:function)"
        )
    args = pretrain_args(launch.path, list(launch.overrides), launch.config, recipe=recipe)
    return module_script(args, python=python)


def module_script(args: Sequence[str], *, python: str = "python") -> run.Script:
    """``python -m MODULE ARGS`` (``args`` starting with ``-m MODULE``) as a ``run.Script``."""
    if len(args) < 2 or args[0] != "-m":
        raise ValueError(f"args: must start with -m MODULE, got {list(args)[:2]!r}")
    import nemo_run as run

    return run.Script(path=args[1], args=list(args[2:]), entrypoint=python, m=True)


def slurm_executor(launch: LaunchConfig, *, account: str,
                   signal_seconds: int = DEFAULT_SIGNAL_SECONDS, retries: int = DEFAULT_RETRIES,
                   env_vars: Optional[Mapping[str, str]] = None, master_port: int = 29500,
                   **executor_kwargs: Any) -> run.SlurmExecutor:
    """A ``run.SlurmExecutor`` laid out from the checked config.

    ``executor_kwargs`` go to ``SlurmExecutor`` as they are (``partition``,
    ``time``, ``container_image``, ``container_mounts``, ``tunnel``,
    ``packager``, ...); the layout fields come from ``launch`` and may not be
    given here. ``env_vars`` are added after ours. ``signal_seconds``: SLURM
    sends USR1 to the ranks this long before the time limit; they save and
    exit with 75, and the job requeues (at most ``retries`` times).
    """
    import nemo_run as run

    layout = {"nodes", "ntasks_per_node", "gpus_per_node", "launcher", "torchrun_nproc_per_node"}
    clash = sorted(layout & set(executor_kwargs))
    if clash:
        raise ValueError(f"{clash[0]}: set by the run config's layout (load_config's arguments), "
                         "not by slurm_executor")
    for name, value, minimum in (("signal_seconds", signal_seconds, 1), ("retries", retries, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    tunnel = executor_kwargs.get("tunnel")
    job_dir = getattr(tunnel, "job_dir", "") or os.environ.get("NEMORUN_HOME", "")
    if not executor_kwargs.get("container_image") and _RUNDIR in job_dir:
        # NeMo-Run 0.11.1 without a container replaces every "/nemo_run" in the script
        # with the job directory (its in-container name), so the job's own paths break.
        raise ValueError(f"tunnel.job_dir: must not contain {_RUNDIR!r} for a job without a container "
                         f"(NeMo-Run rewrites it in the sbatch script), got {job_dir!r}")
    gpus = launch.gpus_per_node
    env = {name: value for name, value, _why in job_env(gpus)}
    if gpus:
        # One torchrun per node (NeMo-Run's Torchrun launcher rendezvouses on the
        # head node); torchrun must pass USR1 on to the ranks, and give them time to save.
        env["PET_SIGNALS_TO_HANDLE"] = TORCHRUN_SIGNALS
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(max(signal_seconds - 30, 30))
        layout_kwargs = dict(nodes=launch.nodes, ntasks_per_node=gpus, gpus_per_node=gpus,
                             launcher=run.Torchrun())
    else:
        # One srun task per gloo rank; the ranks read SLURM_PROCID/SLURM_NTASKS and
        # meet on the head node (NeMo-Run's script sets head_node_ip).
        env["MASTER_ADDR"] = "$head_node_ip"
        env["MASTER_PORT"] = str(master_port)
        layout_kwargs = dict(nodes=launch.nodes, ntasks_per_node=launch.tasks_per_node)
    env.update(env_vars or {})
    additional = dict(executor_kwargs.pop("additional_parameters", None) or {})
    # scontrol requeue needs a requeueable job (sites may default JobRequeue=0).
    additional.setdefault("requeue", True)
    executor_kwargs.setdefault("exclusive", True)
    return run.SlurmExecutor(
        account=account, signal=f"USR1@{signal_seconds}", retries=retries, env_vars=env,
        additional_parameters=additional, **layout_kwargs, **executor_kwargs,
    )

