"""The NeMo-Run launch path's checks that need no nemo_run (nemo_run itself is in the NeMo-Run lane's venv).

``integrations.nemo_run.load_config`` is what stands between a run config and
NeMo-Run: the layout merged the way ``nemo-lossfree slurm`` merges it, and a
bad config refused in one line before any NeMo-Run object exists. The Bridge
command line and job environment are shared with ``nemo-lossfree slurm``
(``integrations.launch``). The tasks, executors and jobs are checked in
.ci/lanes/45-nemo-run.sh.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nemo_lossfree.apps.slurm.job import SlurmJob
from nemo_lossfree.apps.slurm.render import render_sbatch
from nemo_lossfree.integrations import launch
from nemo_lossfree.integrations.nemo_run import load_config, module_script
from nemo_lossfree.runconfig.load import RunConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny-cpu.yaml")
DSV3 = str(REPO / "configs" / "deepseek-v3-1024gpu.yaml")


def test_layout_comes_from_the_config_and_the_arguments_win():
    assert load_config(TINY).config["cluster"] == {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 2}
    gpu = load_config(DSV3)
    assert (gpu.nodes, gpu.gpus_per_node, gpu.tasks_per_node) == (128, 8, 8)
    # A GPU count given for the job starts from its own one-rank-per-GPU layout,
    # not the file's tasks per node (as `nemo-lossfree slurm --gpus-per-node`).
    four = load_config(DSV3, nodes=256, gpus_per_node=4)
    assert four.config["cluster"] == {"nodes": 256, "gpus_per_node": 4, "tasks_per_node": 4}
    assert load_config(TINY, ["train.train_iters=7"]).config["train"]["train_iters"] == 7


def test_a_bad_config_is_one_line_naming_the_key():
    with pytest.raises(RunConfigError) as exc:
        load_config(TINY, ["model.expert_model_parallel_size=3"])
    message = str(exc.value)
    assert message.startswith("model.expert_model_parallel_size: ") and "\n" not in message
    assert "more problem(s)" in message and message.endswith("; nothing submitted")
    # The job's layout is checked with the config: expert parallel 2 needs 2 ranks.
    with pytest.raises(RunConfigError, match=r"^model.expert_model_parallel_size: .*world size 1"):
        load_config(TINY, tasks_per_node=1)
    with pytest.raises(RunConfigError, match=r"^lossfree.update_rate: "):
        load_config(TINY, ["lossfree.update_rate=-1"])
    with pytest.raises(RunConfigError, match=r"^lossfree.update_rulee: unknown key"):
        load_config(TINY, ["lossfree.update_rulee=sign"])


def test_module_script_needs_a_module():
    with pytest.raises(ValueError, match=r"^args: must start with -m MODULE"):
        module_script(["worker.py", "--x"])


def test_the_bridge_command_resumes_from_its_save_directory():
    args = launch.pretrain_args("c.yaml", ["train.train_iters=5"], {"checkpoint": {"save": "/ckpt"}},
                                recipe="deepseek_v3_pretrain_config")
    assert args == ["-m", launch.PRETRAIN_MODULE, "--recipe", "deepseek_v3_pretrain_config",
                    "--config-file", "c.yaml", "train.train_iters=5", "checkpoint.load=/ckpt"]
    # An explicit load directory (in the file or an override) is kept.
    assert launch.pretrain_args("c.yaml", [], {"checkpoint": {"save": "/a", "load": "/b"}})[-1] == "c.yaml"
    assert launch.pretrain_args("c.yaml", ["checkpoint.load=/b"], {"checkpoint": {"save": "/a"}})[-1] \
        == "checkpoint.load=/b"


def test_both_launchers_export_the_same_job_environment():
    gpu = render_sbatch(SlurmJob(command=["-m", launch.PRETRAIN_MODULE], gpus_per_node=8))
    cpu = render_sbatch(SlurmJob(command=["-m", "nemo_lossfree.apps.demo.worker"], python=sys.executable))
    for gpus, script in ((8, gpu), (0, cpu)):
        for name, value, _why in launch.job_env(gpus):
            assert f"export {name}={value}" in script
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in cpu and "OMP_NUM_THREADS" not in gpu
    assert f"PET_SIGNALS_TO_HANDLE={launch.TORCHRUN_SIGNALS}" in gpu
