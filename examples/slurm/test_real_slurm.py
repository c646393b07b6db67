"""`nemo-lossfree slurm` against a real SLURM: a job that finishes, a job that is preempted.

Run by .ci/lanes/40-slurm.sh after `examples/slurm/local_cluster.sh start`
(it needs SLURM_CONF pointing at a running cluster; without one it fails, it
does not skip). It lives outside tests/ so that `make test`, which has no
cluster, does not collect it:

    eval "$(examples/slurm/local_cluster.sh env)"
    .venv/bin/python -m pytest -q examples/slurm/test_real_slurm.py

Layout: NLF_SLURM_NODES nodes x NLF_SLURM_TASKS ranks per node (default
1 x 2, `--ntasks-per-node 2`; with NLF_SLURM_NODES=2 and the namespace
cluster, 2 x 1: the two ranks rendezvous across two "nodes").

1. The tiny config runs to completion through `--wait`: exit code 0, and the
   job's log shows the balancer at work (MaxVio_batch logged every step and
   falling).
2. The same job launched through torchrun (the GPU jobs' launcher), sent
   `scancel --batch --signal=USR1` mid-run (what SLURM's --signal=B:USR1@N
   does before a time limit): the batch script forwards USR1, torchrun passes
   it to the ranks, they checkpoint and stop, the job requeues itself,
   resumes from the checkpoint, and ends with the same final per-layer biases
   and balancer state as the uninterrupted run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_lossfree.apps.demo.protocol import progress_events
from nemo_lossfree.apps.slurm import submit as slurm
from nemo_lossfree.testing.slurm_jobs import (
    SHORT_RUN_OVERRIDES,
    assert_resumed_to_the_same_end,
    job_results,
    require_cluster,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG = os.environ.get("NLF_SLURM_CONFIG", str(REPO / "configs" / "tiny-cpu.yaml"))
NODES = os.environ.get("NLF_SLURM_NODES", "1")
TASKS = os.environ.get("NLF_SLURM_TASKS", str(max(1, 2 // int(NODES))))
OVERRIDES = os.environ.get("NLF_SLURM_OVERRIDES", " ".join(SHORT_RUN_OVERRIDES)).split()
JOB_TIMEOUT_S = 600
# The preemption test waits up to JOB_TIMEOUT_S for the job to get going and
# as long again for it to requeue and finish; pytest's default 600 s cut
# such a run off on a loaded machine while the resumed job was finishing
# (the lane's hard timeout still bounds the whole file).
pytestmark = pytest.mark.timeout(2 * JOB_TIMEOUT_S + 120)


def _job_args(out_dir: Path, name: str, launcher: str) -> list[str]:
    return [sys.executable, "-m", "nemo_lossfree.apps.cli", "slurm", "--config", CONFIG,
            "--gpus-per-node", "0", "--nodes", NODES, "--ntasks-per-node", TASKS,
            "--launcher", launcher, "--job-name", name, "--output-dir", str(out_dir), *OVERRIDES]


def _events(log: Path) -> list[dict]:
    return progress_events(log.read_text(errors="replace"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    require_cluster()
    out_dir = tmp_path_factory.mktemp("full")
    proc = subprocess.run(_job_args(out_dir, "full", "srun") + ["--wait", "--wait-timeout", str(JOB_TIMEOUT_S)],
                          cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT_S + 60)
    logs = list((out_dir / "logs").glob("full-*.out"))
    log_text = logs[0].read_text(errors="replace")[-4000:] if logs else "(no log)"
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n--- job log tail ---\n{log_text}"
    return out_dir


def test_job_completes_and_the_balancer_runs(full_run):
    (log,) = (full_run / "logs").glob("full-*.out")
    steps = [e for e in _events(log) if e["event"] == "step"]
    total = steps[0]["steps"]
    assert [e["step"] for e in steps] == list(range(1, total + 1))
    maxvio = [e["maxvio_batch"] for e in steps]
    assert all(v >= 0 for v in maxvio)
    # The routers drift out of balance as they learn; the bias pulls them
    # back: the last 5 steps' MaxVio is well below its worst 5-step stretch.
    windows = [sum(maxvio[i:i + 5]) / 5 for i in range(len(maxvio) - 4)]
    assert windows[-1] < 0.7 * max(windows), f"MaxVio_batch did not fall: {[round(v, 2) for v in maxvio]}"
    result = job_results(full_run)
    assert result["finished"] and result["steps_done"] == total
    assert any(any(b != 0.0 for b in layer) for layer in result["final_bias"]), "biases never moved"
    # The ranks ran where SLURM put them: one srun task per rank.
    assert f"{int(NODES) * int(TASKS)} ranks" in (full_run / "full.sbatch").read_text()


def test_preempted_job_requeues_and_resumes_to_the_same_biases(full_run, tmp_path):
    # torchrun this time: the launcher of GPU jobs (one per node, rendezvous on
    # the head node), which must pass USR1 on to its ranks. The ranks' results
    # depend on their rank only, so both launchers must give the same biases.
    proc = subprocess.run(_job_args(tmp_path, "preempt", "torchrun"), cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    log = tmp_path / "logs" / f"preempt-{job_id}.out"
    total = job_results(full_run)["steps_done"]
    # Preempt mid-run: after a third of the steps, before the end.
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        steps = [e["step"] for e in _events(log) if e["event"] == "step"] if log.exists() else []
        if steps and steps[-1] >= total // 3:
            break
        info = slurm.job_info(job_id)
        assert info.state not in slurm.TERMINAL_STATES, f"job ended before it was preempted: {info.state}"
        assert time.monotonic() < deadline, "the job never got going"
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    info = slurm.wait(job_id, poll_s=1.0, timeout_s=JOB_TIMEOUT_S)
    text = log.read_text(errors="replace")
    assert info.state == "COMPLETED" and info.exit_code == 0, text[-4000:]
    assert info.restarts == 1, text[-4000:]

    events = _events(log)
    stopped = [e for e in events if e["event"] == "stopped"]
    starts = [e for e in events if e["event"] == "start"]
    assert len(stopped) == 1 and 0 < stopped[0]["step"] < total, text[-4000:]
    assert [s["resumed_from"] is not None for s in starts] == [False, True]
    assert starts[1]["step"] == stopped[0]["step"]  # resumed where it stopped
    assert "USR1 received" in text and "requeueing job" in text and "(restart 1)" in text
    steps_after = [e["step"] for e in events if e["event"] == "step"][-(total - stopped[0]["step"]):]
    assert steps_after == list(range(stopped[0]["step"] + 1, total + 1))

    assert_resumed_to_the_same_end(tmp_path, full_run)
