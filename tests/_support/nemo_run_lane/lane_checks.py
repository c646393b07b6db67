"""NeMo-Run lane checks (run by .ci/lanes/45-nemo-run.sh in its own venv, where nemo_run is installed).

Without a cluster: the tasks and executors ``nemo_lossfree.integrations.nemo_run``
builds from run configs (the command line, the environment, the sbatch script
NeMo-Run renders from them) and the refusals before anything is submitted.
With the lane's one-node SLURM cluster (SLURM_CONF set; without it those tests
fail, they do not skip): configs/tiny-cpu.yaml submitted through NeMo-Run's
SlurmExecutor runs to completion with the biases moving, and the same job sent
USR1 mid-run checkpoints, exits 75, is requeued by NeMo-Run's script and
resumes to the uninterrupted run's biases.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nemo_run as run
import pytest

from nemo_lossfree.apps.demo.protocol import progress_events
from nemo_lossfree.apps.slurm import submit as slurm
from nemo_lossfree.apps.slurm.nemo_run import demo_worker_script
from nemo_lossfree.exit_codes import EXIT_STOPPED
from nemo_lossfree.integrations import nemo_run as lossfree_run
from nemo_lossfree.runconfig.load import RunConfigError, load_run_config
from nemo_lossfree.testing.distributed import free_port
from nemo_lossfree.testing.slurm_jobs import (
    SHORT_RUN_OVERRIDES,
    assert_resumed_to_the_same_end,
    job_results,
    require_cluster,
)

REPO = Path(__file__).resolve().parents[3]
TINY = str(REPO / "configs" / "tiny-cpu.yaml")
DSV3 = str(REPO / "configs" / "deepseek-v3-1024gpu.yaml")
JOB_TIMEOUT_S = 420
pytestmark = pytest.mark.timeout(2 * JOB_TIMEOUT_S + 120)


@contextlib.contextmanager
def _stdin_devnull():
    """NeMo-Run runs its shell commands through invoke, which reads stdin; pytest's refuses reads."""
    saved = sys.stdin
    with open(os.devnull) as devnull:
        sys.stdin = devnull
        try:
            yield
        finally:
            sys.stdin = saved


def _rendered_script(task, executor, name: str, base_dir: Path) -> str:
    """The sbatch script NeMo-Run would submit (its dry run writes it into the experiment directory)."""
    with _stdin_devnull(), run.Experiment(name, executor=executor, base_dir=str(base_dir),
                                          log_level="WARN") as exp:
        exp.add(task, name=name)
        exp.dryrun(log=False, delete_exp_dir=False)
        (job,) = exp.jobs
        (script,) = Path(job.executor.experiment_dir).glob("*_sbatch.sh")
        return script.read_text()


# ------------------------------------------------------------ without a cluster
def test_cpu_task_runs_the_demo_worker_on_the_resolved_config(tmp_path):
    launch = lossfree_run.load_config(TINY, list(SHORT_RUN_OVERRIDES))
    assert launch.config["cluster"] == {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 2}
    task = demo_worker_script(launch, tmp_path / "job")
    assert isinstance(task, run.Script) and task.m and task.entrypoint == sys.executable
    assert task.path == "nemo_lossfree.apps.demo.worker"
    config_file = tmp_path / "job" / "run_config.yaml"
    assert task.args[-2:] == ["--config", str(config_file)]
    assert task.args[task.args.index("--out") + 1] == str(tmp_path / "job" / "results")
    # A requeued job resumes: it loads from where it saves.
    assert task.args[task.args.index("--load") + 1] == task.args[task.args.index("--save") + 1]
    # What the job reads is what was validated: the file, the overrides, the layout.
    written = load_run_config(config_file)
    assert written["train"]["train_iters"] == 30 and written["cluster"]["tasks_per_node"] == 2

    executor = lossfree_run.slurm_executor(launch, account="lossfree", packager=run.Packager(),
                                           tunnel=run.LocalTunnel(job_dir=str(tmp_path / "exp")))
    assert (executor.nodes, executor.ntasks_per_node, executor.gpus_per_node) == (1, 2, None)
    assert executor.signal == "USR1@300" and executor.retries == 20
    assert executor.env_vars["OMP_NUM_THREADS"] == "${OMP_NUM_THREADS:-1}"
    assert executor.env_vars["MASTER_ADDR"] == "$head_node_ip"
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in executor.env_vars


def test_gpu_task_is_the_bridge_entry_point_under_torchrun(tmp_path):
    launch = lossfree_run.load_config(DSV3, ["train.train_iters=1000"])
    task = lossfree_run.pretrain_script(launch, recipe="deepseek_v3_pretrain_config")
    assert task.path == "nemo_lossfree.integrations.bridge.pretrain" and task.m
    save = load_run_config(DSV3).get("checkpoint", {}).get("save")
    expected = ["--recipe", "deepseek_v3_pretrain_config", "--config-file", DSV3, "train.train_iters=1000"]
    if save and not load_run_config(DSV3)["checkpoint"].get("load"):
        expected.append(f"checkpoint.load={save}")  # a requeued job resumes
    assert task.args == expected

    executor = lossfree_run.slurm_executor(
        launch, account="acct", partition="batch", time="04:00:00", container_image="nvcr.io/nvidia/nemo:TAG",
        container_mounts=["/lustre:/lustre"], packager=run.Packager(),
        tunnel=run.LocalTunnel(job_dir=str(tmp_path / "exp")),
    )
    assert isinstance(executor.launcher, run.Torchrun)
    env = executor.env_vars
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and "SIGUSR1" in env["PET_SIGNALS_TO_HANDLE"]
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "270"
    # The script NeMo-Run renders for it.
    script = _rendered_script(task, executor, "dsv3", tmp_path / "nemorun-home")
    for line in ("#SBATCH --nodes=128", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR1@300", "#SBATCH --requeue", "#SBATCH --exclusive",
                 "export CUDA_DEVICE_MAX_CONNECTIONS=1", "--container-image nvcr.io/nvidia/nemo:TAG"):
        assert line in script, line
    assert re.search(r"--nnodes 128 --nproc-per-node 8 .*-m nemo_lossfree\.integrations\.bridge\.pretrain "
                     r"--recipe deepseek_v3_pretrain_config", script), script


def test_a_bad_config_is_one_line_before_anything_is_written(tmp_path):
    with pytest.raises(RunConfigError) as exc:
        lossfree_run.load_config(TINY, ["model.expert_model_parallel_size=3"])
    message = str(exc.value)
    assert "\n" not in message and message.startswith("model.expert_model_parallel_size:")
    assert message.endswith("nothing submitted")
    with pytest.raises(RunConfigError, match=r"^lossfree.update_rate: "):
        lossfree_run.load_config(TINY, ["lossfree.update_rate=-1"])
    # The layout given for the job is checked with the config: EP 2 needs 2 ranks.
    with pytest.raises(RunConfigError, match=r"^model.expert_model_parallel_size: "):
        lossfree_run.load_config(TINY, tasks_per_node=1)
    launch = lossfree_run.load_config(TINY)
    with pytest.raises(ValueError, match=r"^ntasks_per_node: set by the run config's layout"):
        lossfree_run.slurm_executor(launch, account="a", ntasks_per_node=4)
    with pytest.raises(ValueError, match=r"^recipe: "):
        lossfree_run.pretrain_script(launch, recipe="")
    with pytest.raises(ValueError, match=r"^tunnel.job_dir: must not contain '/nemo_run'"):
        lossfree_run.slurm_executor(launch, account="a", tunnel=run.LocalTunnel(job_dir="/x/nemo_run_jobs"))
    gpu = lossfree_run.load_config(DSV3)
    with pytest.raises(ValueError, match=r"^cluster.gpus_per_node: the demo worker runs on CPUs"):
        demo_worker_script(gpu, tmp_path / "gpu-job")
    # A key the CPU model cannot run is refused before the config is written.
    with pytest.raises(ValueError):
        demo_worker_script(lossfree_run.load_config(TINY, ["optimizer.bf16=true"]), tmp_path / "bf16-job")
    assert not (tmp_path / "gpu-job").exists() and not (tmp_path / "bf16-job").exists()


# ------------------------------------------------------------ on the local cluster
def _events(log: Path) -> list[dict]:
    return progress_events(log.read_text(errors="replace"))


def _submit(tmp_path: Path, name: str) -> tuple[str, Path, Path]:
    """Submit the tiny CPU job through NeMo-Run; ``(job id, job output dir, NeMo-Run's job dir)``."""
    out = tmp_path / name
    launch = lossfree_run.load_config(TINY, list(SHORT_RUN_OVERRIDES))
    task = demo_worker_script(launch, out)
    executor = lossfree_run.slurm_executor(
        launch, account="lossfree", packager=run.Packager(), time="00:20:00",
        # A LocalTunnel submits from NeMo-Run's experiment directory itself: its job_dir is
        # the experiments/ folder of the Experiment's base_dir (default: NEMORUN_HOME).
        tunnel=run.LocalTunnel(job_dir=str(tmp_path / "nemorun-home" / "experiments")),
        # The ranks import this checkout (the lane venv sees the project venv's packages).
        env_vars={"PYTHONPATH": str(REPO)}, master_port=free_port(),
    )
    with _stdin_devnull(), run.Experiment(name, executor=executor, base_dir=str(tmp_path / "nemorun-home"),
                                          log_level="WARN") as exp:
        exp.add(task, name=name)
        exp.run(detach=True)
        (job,) = exp.jobs
        job_id = job.handle.rstrip("/").split("/")[-1]
        job_dir = Path(job.executor.job_dir)
    assert job_id.isdigit(), job.handle
    return job_id, out, job_dir


def _logs(job_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(job_dir.glob("log-*.out")))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    require_cluster()
    tmp = tmp_path_factory.mktemp("full")
    job_id, out, job_dir = _submit(tmp, "full")
    info = slurm.wait(job_id, poll_s=1.0, timeout_s=JOB_TIMEOUT_S)
    logs = _logs(job_dir)
    assert info.state == "COMPLETED" and info.exit_code == 0, f"{info.state} {info.exit_code}\n{logs[-4000:]}"
    return out


def test_nemo_run_job_completes_and_the_balancer_runs(full_run):
    result = job_results(full_run)
    assert result["finished"] and result["steps_done"] == 30
    assert any(any(b != 0.0 for b in layer) for layer in result["final_bias"]), "biases never moved"


def test_usr1_checkpoints_and_nemo_run_requeues_to_the_same_biases(full_run, tmp_path):
    job_id, out, job_dir = _submit(tmp_path, "preempt")
    total = job_results(full_run)["steps_done"]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        logs = [p for p in job_dir.glob("log-*.out")]
        steps = [e["step"] for p in logs for e in _events(p) if e["event"] == "step"]
        if steps and max(steps) >= total // 3:
            break
        info = slurm.job_info(job_id)
        assert info.state not in slurm.TERMINAL_STATES, f"job ended before it was preempted: {info.state}"
        assert time.monotonic() < deadline, "the job never got going"
        time.sleep(0.5)
    # What --signal=USR1@N does before the time limit: USR1 to the job's steps (the ranks).
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    info = slurm.wait(job_id, poll_s=1.0, timeout_s=JOB_TIMEOUT_S)
    text = _logs(job_dir) + "".join(p.read_text(errors="replace") for p in job_dir.glob("sbatch_*.out"))
    assert info.state == "COMPLETED" and info.exit_code == 0, text[-4000:]
    assert info.restarts == 1, text[-4000:]
    # One log per run (NeMo-Run names them by SLURM_RESTART_COUNT).
    first, second = (_events(job_dir / name) for name in sorted(p.name for p in job_dir.glob("log-*.out")))
    stopped = [e for e in first if e["event"] == "stopped"]
    assert len(stopped) == 1 and 0 < stopped[0]["step"] < total, text[-4000:]
    # NeMo-Run's script saw the step fail and requeued: the ranks saved and exited 75, and
    # NeMo-Run's `srun --kill-on-bad-exit=1` may have ended the slower ones with SIGTERM (143).
    codes = [int(c) for c in re.findall(r"^job exited with code (\d+)$", text, re.M)]
    assert len(codes) == 2 and codes[0] in (EXIT_STOPPED, 128 + 15) and codes[1] == 0, codes
    assert "+ scontrol requeue" in text
    start = [e for e in second if e["event"] == "start"]
    assert start and start[0]["resumed_from"] is not None and start[0]["step"] == stopped[0]["step"]
    assert_resumed_to_the_same_end(out, full_run)
