"""The rendered sbatch scripts: layout, environment, pyxis, preemption, syntax.

Fast (no SLURM needed): the scripts are checked as text, by `bash -n`, and run
by bash against stand-in `srun`/`scontrol`/`scancel` programs that record what
they were asked to do. The real-SLURM test is tests/test_slurm_cluster.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nemo_lossfree.apps.slurm.job import SlurmJob
from nemo_lossfree.apps.slurm.render import render_sbatch
from nemo_lossfree.exit_codes import EXIT_STOPPED

PRETRAIN = ["-m", "nemo_lossfree.integrations.bridge.pretrain", "--config-file", "configs/big.yaml"]


def gpu_job(**overrides) -> SlurmJob:
    fields = dict(command=list(PRETRAIN), nodes=128, gpus_per_node=8, job_name="moe-128n",
                  account="acct", partition="batch", time="04:00:00",
                  container_image="nvcr.io/nvidia/nemo:25.11", container_mounts="/lustre:/lustre",
                  signal_seconds=240)
    fields.update(overrides)
    return SlurmJob(**fields)


def sbatch_options(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def bash_array(script: str, name: str) -> list[str]:
    match = re.search(rf"^{name}=\(\n(.*?)\n\)$", script, re.S | re.M)
    assert match, f"no {name}=( ... ) array in the script"
    return [line.strip() for line in match.group(1).splitlines()]


def test_multi_node_gpu_layout_header():
    script = render_sbatch(gpu_job())
    assert script.startswith("#!/bin/bash\n")
    assert sbatch_options(script) == [
        "--job-name=moe-128n",
        "--nodes=128",
        "--ntasks-per-node=1",  # one torchrun per node
        "--gpus-per-node=8",
        "--exclusive",
        "--account=acct",
        "--partition=batch",
        "--time=04:00:00",
        "--output=logs/%x-%j.out",  # one log per job
        "--open-mode=append",  # a requeued job continues its log
        "--signal=B:USR1@240",  # to the batch shell, whose trap forwards it
        "--requeue",
    ]


def test_multi_node_gpu_environment_and_torchrun_rendezvous():
    script = render_sbatch(gpu_job())
    assert re.search(r"^export CUDA_DEVICE_MAX_CONNECTIONS=1$", script, re.M)
    for name in ("NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_IB_TIMEOUT"):
        assert re.search(rf"^export {name}=", script, re.M), name
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert bash_array(script, "srun_args") == [
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--label",
        "--container-image=nvcr.io/nvidia/nemo:25.11",
        "--container-mounts=/lustre:/lustre",
        '--container-workdir="$PWD"',
    ]
    assert bash_array(script, "launch") == [
        "python",
        "-m torch.distributed.run",
        '--nnodes="$SLURM_NNODES"',
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"',
        '--rdzv-id="$SLURM_JOB_ID"',
        "--max-restarts=0",
        "-m nemo_lossfree.integrations.bridge.pretrain",
        "--config-file configs/big.yaml",
    ]
    # torchrun must pass USR1 on to its ranks, and give them time to save.
    assert "export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in script
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=210" in script
    assert "trap forward_stop_signal USR1" in script
    assert 'scancel --signal=USR1 "$SLURM_JOB_ID"' in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script


def test_scripts_pass_bash_syntax_check(tmp_path):
    jobs = {
        "gpu": gpu_job(),
        "gpu-no-image": gpu_job(container_image=None, container_mounts=None, account=None,
                                partition=None, time=None),
        "gpu-srun": gpu_job(ntasks_per_node=8),
        "cpu": SlurmJob(command=["-m", "nemo_lossfree.apps.demo.worker", "--arm", "loss_free", "--out", "a b"],
                        nodes=2, gpus_per_node=0, ntasks_per_node=2, requeue=False),
    }
    for name, job in jobs.items():
        path = tmp_path / f"{name}.sbatch"
        path.write_text(render_sbatch(job))
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, (name, proc.stderr)
        assert "{{" not in path.read_text(), name


def test_one_task_per_gpu_uses_srun_and_slurm_ranks():
    script = render_sbatch(gpu_job(ntasks_per_node=8, container_image=None, container_mounts=None))
    assert "--ntasks-per-node=8" in sbatch_options(script)
    assert "torch.distributed.run" not in script
    assert bash_array(script, "launch") == ["python", "-m nemo_lossfree.integrations.bridge.pretrain",
                                            "--config-file configs/big.yaml"]
    assert not any("container" in a for a in bash_array(script, "srun_args"))


def test_cpu_layout_has_no_gpu_settings():
    job = SlurmJob(command=["-m", "nemo_lossfree.apps.demo.worker"], nodes=2, gpus_per_node=0,
                   ntasks_per_node=2, log_dir="/tmp/x/logs", workdir="/tmp/x")
    script = render_sbatch(job)
    options = sbatch_options(script)
    assert "--ntasks-per-node=2" in options and "--nodes=2" in options
    assert not any(o.startswith("--gpus") for o in options)
    assert "--output=/tmp/x/logs/%x-%j.out" in options and "--chdir=/tmp/x" in options
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in script and "NCCL" not in script
    assert "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}" in script
    assert job.world_size == 4 and job.launcher == "srun"


@pytest.mark.parametrize("fields, message", [
    (dict(launcher="mpirun"), "--launcher: must be one of torchrun, srun"),
    (dict(ntasks_per_node=4), "--ntasks-per-node: with GPUs it must be 1"),
    (dict(nodes=0), "--nodes: must be an integer >= 1"),
    (dict(time="4 hours"), "--time: must be a SLURM time"),
    (dict(container_image=None), "--container-mounts: needs --container-image"),
    (dict(job_name="my job"), "--job-name: must be letters"),
    (dict(partition=""), "--partition: must be a non-empty word"),
    (dict(master_port=80), "--master-port: must be an integer >= 1024"),
])
def test_bad_layouts_name_the_flag(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        gpu_job(**fields)


# ---- the script's logic, run by bash against stand-in SLURM commands ----------

FAKE_SCONTROL = """\
#!/bin/bash
# show hostnames <list>: expand the test's node list; requeue <id>: record it.
case "$1 $2" in
  "show hostnames") printf '%s\\n' gpu-a17 gpu-b03 gpu-c11 ;;
  "requeue "*) echo "requeue $2" >> "$FAKE_DIR/calls" ;;
  *) echo "unexpected scontrol $*" >&2; exit 1 ;;
esac
"""
# srun: record argv and the rendezvous env, then behave as FAKE_MODE says.
FAKE_SRUN = """\
#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_DIR/srun_argv"
env | grep -E '^(MASTER_ADDR|MASTER_PORT|CUDA_DEVICE_MAX_CONNECTIONS|PET_SIGNALS_TO_HANDLE)=' \\
  | sort > "$FAKE_DIR/srun_env"
if [ "$FAKE_MODE" = preempt ]; then
  # The training: on USR1 save and exit with the "stopped, resume me" code.
  trap 'echo saved >> "$FAKE_DIR/calls"; exit STOPPED' USR1
  echo $$ > "$FAKE_DIR/srun_pid"
  for _ in $(seq 1 300); do sleep 0.1; done
  exit 1
fi
exit "${FAKE_EXIT:-0}"
""".replace("STOPPED", str(EXIT_STOPPED))
# scancel --signal=USR1 <id>: deliver it to the (fake) training tasks.
FAKE_SCANCEL = """\
#!/bin/bash
echo "scancel $*" >> "$FAKE_DIR/calls"
kill -USR1 "$(cat "$FAKE_DIR/srun_pid")"
"""


def _fake_slurm(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-a17,gpu-b03,gpu-c11", SLURM_NNODES="3")
    (tmp_path / "calls").write_text("")
    return env


def _script(tmp_path: Path, job: SlurmJob) -> Path:
    path = tmp_path / "job.sbatch"
    path.write_text(render_sbatch(job))
    return path


def test_script_rendezvous_on_first_node_and_exit_code(tmp_path):
    env = _fake_slurm(tmp_path)
    job = gpu_job(nodes=3, master_port=29611)
    proc = subprocess.run(["bash", str(_script(tmp_path, job))], env=dict(env, FAKE_EXIT="3"),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3, proc.stdout + proc.stderr  # the training's failure is the job's
    assert (tmp_path / "srun_env").read_text().splitlines() == [
        "CUDA_DEVICE_MAX_CONNECTIONS=1",
        "MASTER_ADDR=gpu-a17",
        "MASTER_PORT=29611",
        "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
    ]
    argv = (tmp_path / "srun_argv").read_text().splitlines()
    assert argv[:3] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "--label"]
    assert f"--container-workdir={tmp_path}" not in argv  # $PWD of the script, not ours
    assert "--rdzv-endpoint=gpu-a17:29611" in argv and "--nnodes=3" in argv
    assert "--rdzv-id=4242" in argv
    assert argv[-4:] == PRETRAIN
    assert "requeue" not in (tmp_path / "calls").read_text()


def _run_preempted(tmp_path: Path, job: SlurmJob, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(["bash", str(_script(tmp_path, job))], env=dict(env, FAKE_MODE="preempt"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while not (tmp_path / "srun_pid").exists():
        assert time.monotonic() < deadline, "the training step never started"
        time.sleep(0.05)
    # What SLURM does at --signal=B:USR1@N (and scancel --batch --signal=USR1).
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def test_usr1_is_forwarded_then_the_job_requeues_itself(tmp_path):
    env = _fake_slurm(tmp_path)
    result = _run_preempted(tmp_path, gpu_job(), env)
    assert result.returncode == 0, result.stdout
    assert (tmp_path / "calls").read_text().splitlines() == [
        "scancel --signal=USR1 4242",
        "saved",
        "requeue 4242",
    ]
    assert f"training step exited with {EXIT_STOPPED}" in result.stdout


def test_no_requeue_after_max_requeues_or_when_disabled(tmp_path):
    env = _fake_slurm(tmp_path)
    result = _run_preempted(tmp_path, gpu_job(max_requeues=3), dict(env, SLURM_RESTART_COUNT="3"))
    assert result.returncode == EXIT_STOPPED, result.stdout
    assert "requeue" not in (tmp_path / "calls").read_text()

    (tmp_path / "srun_pid").unlink()
    (tmp_path / "calls").write_text("")
    result = _run_preempted(tmp_path, gpu_job(requeue=False), env)
    assert "#SBATCH --no-requeue" in (tmp_path / "job.sbatch").read_text()
    assert result.returncode == EXIT_STOPPED, result.stdout
    assert (tmp_path / "calls").read_text().splitlines() == ["scancel --signal=USR1 4242", "saved"]


# ---- the examples in examples/slurm/ ----------------------------------------

REPO = Path(__file__).resolve().parents[1]


def test_every_config_has_a_valid_example_with_its_layout():
    from nemo_lossfree.runconfig.load import load_run_config

    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs, "no configs/*.yaml"
    for config_path in configs:
        example = REPO / "examples" / "slurm" / f"{config_path.stem}.sbatch"
        assert example.exists(), f"{example.name} missing: run `make slurm-examples`"
        text = example.read_text()
        proc = subprocess.run(["bash", "-n", str(example)], capture_output=True, text=True)
        assert proc.returncode == 0, (example.name, proc.stderr)
        cluster = load_run_config(config_path)["cluster"]
        options = sbatch_options(text)
        stale = f"{example.name} does not match {config_path.name}: run `make slurm-examples`"
        assert f"--nodes={cluster['nodes']}" in options, stale
        if cluster["gpus_per_node"]:
            assert f"--gpus-per-node={cluster['gpus_per_node']}" in options, stale
            assert f"--config-file configs/{config_path.name}" in bash_array(text, "launch"), stale
        else:
            assert f"--ntasks-per-node={cluster['tasks_per_node']}" in options, stale
            assert "-m nemo_lossfree.apps.demo.worker" in bash_array(text, "launch"), stale


# ---- the command line ---------------------------------------------------------

TINY = textwrap.dedent("""\
    cluster: {nodes: 1, gpus_per_node: 0, tasks_per_node: 2}
    model: {num_layers: 2, hidden_size: 32, num_attention_heads: 4, num_moe_experts: 8,
            moe_router_topk: 2, seq_length: 32, expert_model_parallel_size: 2,
            tensor_model_parallel_size: 1}
    train: {train_iters: 30, global_batch_size: 16, micro_batch_size: 2}
    optimizer: {lr: 0.003}
    scheduler: {lr_warmup_iters: 3}
    rng: {seed: 7}
    checkpoint: {save: null, save_interval: 10}
    lossfree: {enabled: true, update_rate: 0.01, center: true}
""")


def _repo_env() -> dict:
    """The environment with this checkout first on the path: the commands run in a temporary
    directory, where an editable install of another checkout (a git worktree's main) would win."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nemo_lossfree.apps.cli", "slurm", *argv],
                          cwd=cwd, env=_repo_env(), capture_output=True, text=True, timeout=180)


def test_cli_cpu_job_hands_the_worker_the_resolved_run_config(tmp_path):
    """The worker reads the job's run config (no flag table between the YAML and what trains)."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    proc = _cli("--config", "tiny.yaml", "--dry-run", "--output-dir", "job",
                "train.train_iters=12", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert "--ntasks-per-node=2" in sbatch_options(script)  # from cluster.tasks_per_node
    launch = bash_array(script, "launch")
    assert launch[0] == sys.executable and launch[1] == "-m nemo_lossfree.apps.demo.worker"
    job = tmp_path / "job"
    for expected in ("--arm loss_free", f"--out {job}/results", f"--save {job}/checkpoints",
                     f"--load {job}/checkpoints", "--save-interval 10", f"--config {job}/run_config.yaml"):
        assert expected in launch, expected
    assert not any(arg.startswith(("--steps", "--lossfree ", "--experts")) for arg in launch), launch
    assert not (tmp_path / "job").exists()  # --dry-run writes nothing


def _worker_settings(monkeypatch, config_file, *overrides, world=2):
    from nemo_lossfree.apps.demo import worker

    monkeypatch.setenv("WORLD_SIZE", str(world))
    argv = ["--arm", "loss_free", "--out", "/tmp/unused", "--config", str(config_file), *overrides]
    parser = worker.build_parser()
    return worker.settings_of(parser, parser.parse_args(argv), argv)


def test_the_worker_trains_the_resolved_run_config(tmp_path, monkeypatch):
    """What the job's file says is what the worker's DemoSettings hold."""
    from nemo_lossfree.apps.commands.slurm import with_layout
    from nemo_lossfree.apps.slurm.job import SlurmJob
    from nemo_lossfree.runconfig.load import load_run_config, save_run_config

    (tmp_path / "tiny.yaml").write_text(TINY)
    config = load_run_config(tmp_path / "tiny.yaml", ["train.train_iters=12"])
    layout = SlurmJob(command=["-c", "pass"], nodes=1, gpus_per_node=0, ntasks_per_node=2)
    save_run_config(with_layout(config, layout), tmp_path / "run_config.yaml")
    settings, ep = _worker_settings(monkeypatch, tmp_path / "run_config.yaml")
    assert ep == 2
    assert (settings.steps, settings.experts, settings.num_layers, settings.lr, settings.lr_warmup_steps,
            settings.seed) == (12, 8, 2, 0.003, 3, 7)
    # 16 sequences / (2 per micro-batch x 2 ranks) = 4 micro-batches per rank
    assert (settings.micro_batch_size, settings.num_micro_batches) == (2, 4)
    assert settings.lossfree == {"update_rate": 0.01, "center": True}


def test_a_cpu_job_refuses_a_model_key_the_demo_would_drop(tmp_path):
    """model.context_parallel_size: 2 was dropped without a word (the payload guarded a misspelt field)."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    proc = _cli("--config", "tiny.yaml", "--dry-run", "model.context_parallel_size=2", cwd=tmp_path)
    assert proc.returncode == 2
    assert "model.context_parallel_size: the CPU demo's model runs 1 (arm loss_free), got 2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_gpu_job_runs_the_bridge_entry_point(tmp_path):
    (tmp_path / "big.yaml").write_text(TINY.replace("save: null", "save: /lustre/ckpt"))
    # 1024 GPUs are 1024 data-parallel replicas of 2 sequences: the batch must grow with them.
    proc = _cli("--config", "big.yaml", "--nodes", "128", "--gpus-per-node", "8", "--dry-run",
                "--recipe", "deepseek_v3_pretrain_config",
                "--container-image", "nvcr.io/nvidia/nemo:25.11", "lossfree.update_rate=0.001",
                "train.global_batch_size=2048", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    launch = bash_array(proc.stdout, "launch")
    assert launch[-6:] == ["-m nemo_lossfree.integrations.bridge.pretrain", "--recipe deepseek_v3_pretrain_config",
                           "--config-file big.yaml", "lossfree.update_rate=0.001",
                           "train.global_batch_size=2048", "checkpoint.load=/lustre/ckpt"]
    assert "--nproc-per-node=8" in launch
    assert "--nodes=128" in sbatch_options(proc.stdout)


@pytest.mark.parametrize("argv, message", [
    # A layout Megatron accepts that the CPU worker does not run (validation passes first).
    (["model.tensor_model_parallel_size=2", "model.sequence_parallel=true", "model.add_bias_linear=false",
      "--ntasks-per-node", "4"],
     "model.tensor_model_parallel_size: the CPU demo's model runs 1"),
    # Megatron's TransformerConfig refuses it (ETP defaults to TP, linear biases are on by default).
    (["model.tensor_model_parallel_size=2", "model.sequence_parallel=true", "--ntasks-per-node", "4"],
     "model: Megatron-Core's TransformerConfig refuses it: \"Bias in Moe is only supported when ETP==1\""),
    (["--ntasks-per-node", "3"], "model.expert_model_parallel_size: EP x ETP = 2 x 1 must divide"),
    (["train.global_batch_size=6"], "train.global_batch_size: must be divisible by micro_batch_size x DP"),
    (["--gpus-per-node", "8", "--ntasks-per-node", "3"], "--ntasks-per-node: with GPUs it must be 1"),
    (["--gpus-per-node", "8"], "--recipe: GPU jobs run nemo_lossfree.integrations.bridge.pretrain"),
    (["--time", "1 day"], "--time: must be a SLURM time"),
])
def test_cli_rejects_bad_input_with_the_key(tmp_path, argv, message):
    (tmp_path / "tiny.yaml").write_text(TINY)
    proc = _cli("--config", "tiny.yaml", "--dry-run", *argv, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_the_tiny_cpu_configs_job_trains_exactly_its_lossfree_section(monkeypatch):
    """What validates is what runs: the job's worker reads the YAML's section, nothing merged in.

    (The demo once merged its own loss-free defaults into the worker's flags,
    and a job of configs/tiny-cpu.yaml failed with min_update_rate > update_rate.)
    """
    from nemo_lossfree import LossFreeConfig
    from nemo_lossfree.runconfig.load import load_run_config

    config = load_run_config(REPO / "configs" / "tiny-cpu.yaml")
    settings, _ = _worker_settings(monkeypatch, REPO / "configs" / "tiny-cpu.yaml")
    assert settings.lossfree_config == LossFreeConfig.from_dict(config["lossfree"])


# ---- jobs that reach the queue are jobs validate-config accepts ------------------

CONFIGS = REPO / "configs"


@pytest.mark.parametrize("argv, message, summary", [
    # The typed lossfree section rejects an unknown override key while reading: one line.
    (["lossfree.update_rat=1"], "lossfree.update_rat: unknown key", False),
    (["lossfree.update_rate=-1"], "lossfree.update_rate: must be a finite number >= 0, got -1", True),
    (["model.num_moe_experts=7"], "model.expert_model_parallel_size: must divide num_moe_experts (7), got 2",
     True),
    (["model.moe_router_topkk=2"], "model.moe_router_topkk: unknown key", True),
], ids=["misspelt-lossfree-key", "negative-rate", "7-experts-on-EP-2", "misspelt-model-key"])
def test_cli_refuses_what_validate_config_refuses(tmp_path, argv, message, summary):
    (tmp_path / "tiny.yaml").write_text(TINY)
    proc = _cli("--config", "tiny.yaml", "--dry-run", *argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert proc.stdout == ""  # no script
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(f"nemo-lossfree slurm: {message}"), proc.stderr
    if summary:
        assert lines[-1] == "nemo-lossfree slurm: tiny.yaml: 1 problem(s); nothing written or submitted"
    else:
        assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_names_the_flag_of_a_missing_config(tmp_path):
    proc = _cli("--config", "nope.yaml", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["nemo-lossfree slurm: --config: nope.yaml: no such file"]


def test_cli_refuses_too_few_nodes_for_the_configs_layout(tmp_path):
    """configs/deepseek-v3-1024gpu.yaml needs a multiple of TP 2 x PP 16 = 32 GPUs; 3 nodes x 8 are 24."""
    config = CONFIGS / "deepseek-v3-1024gpu.yaml"
    proc = _cli("--config", str(config), "--nodes", "3", "--recipe", "deepseek_v3_pretrain_config",
                "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "nemo-lossfree slurm: cluster: world size 24 (nodes 3 x tasks_per_node 8) is not divisible "
        "by TP x PP x CP = 2 x 16 x 1 = 32",
        f"nemo-lossfree slurm: {config}: 1 problem(s) with --nodes 3; nothing written or submitted",
    ]


def _fake_sbatch(tmp_path: Path) -> dict:
    """PATH with an `sbatch` that only records its calls (no cluster is ever asked)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/sbatch_calls\necho 77\n')
    (bin_dir / "sbatch").chmod(0o755)
    return dict(_repo_env(), PATH=f"{bin_dir}:{os.environ['PATH']}")


def test_cli_refuses_a_bad_config_before_writing_or_submitting(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    proc = subprocess.run([sys.executable, "-m", "nemo_lossfree.apps.cli", "slurm", "--config", "tiny.yaml",
                           "--output-dir", "job", "lossfree.update_rate=-1"],
                          cwd=tmp_path, env=_fake_sbatch(tmp_path), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert not (tmp_path / "job").exists()
    assert not (tmp_path / "sbatch_calls").exists()


def _unwritable_dirs(tmp_path: Path) -> list[Path]:
    (tmp_path / "a-file").write_text("")
    dirs = [tmp_path / "a-file" / "x"]
    if Path("/proc/self").exists():
        dirs.append(Path("/proc/x"))
    return dirs


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "submit"])
def test_cli_unwritable_output_dir_is_one_line_naming_the_flag(tmp_path, dry_run):
    (tmp_path / "tiny.yaml").write_text(TINY)
    env = _fake_sbatch(tmp_path)
    for out_dir in _unwritable_dirs(tmp_path):
        argv = ["--config", "tiny.yaml", "--output-dir", str(out_dir)] + (["--dry-run"] if dry_run else [])
        proc = subprocess.run([sys.executable, "-m", "nemo_lossfree.apps.cli", "slurm", *argv],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 2, (out_dir, proc.stdout, proc.stderr)
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"nemo-lossfree slurm: --output-dir: cannot create or write {out_dir}"), proc.stderr
        assert proc.stdout == ""
        assert not (tmp_path / "sbatch_calls").exists()
