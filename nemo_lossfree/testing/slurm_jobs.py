"""What the checks against a real SLURM cluster share (the SLURM lane's and the NeMo-Run lane's).

Both submit configs/tiny-cpu.yaml as a CPU job, once to completion and once
preempted with USR1 and requeued, and compare the two runs' results.
Imported as a plain module (pytest does not rewrite its asserts: they carry
their own messages).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

# Short runs (a lane must stay within a few minutes on 2 cores), tuned so
# that the balancer's effect shows within them: the learning rate that lets
# the routers drift out of balance within ~15 steps (3e-3), and the demo's
# short-horizon bias step (2e-2 decaying as 1/(1 + t/20); the paper's
# constant 1e-3 needs thousands of steps). No periodic checkpoints: the
# preempted run's only checkpoint is the one written on USR1.
SHORT_RUN_OVERRIDES = (
    "train.train_iters=30", "optimizer.lr=0.003", "scheduler.lr_warmup_iters=10",
    "checkpoint.save_interval=1000", "lossfree.update_rate=0.02", "lossfree.schedule=inverse_time",
    "lossfree.decay_steps=20", "lossfree.min_update_rate=0.001",
)


def require_cluster() -> None:
    """Fail (never skip) unless a SLURM cluster answers: the lanes start one before their checks."""
    if not os.environ.get("SLURM_CONF") or shutil.which("sbatch") is None:
        pytest.fail("no SLURM here: start examples/slurm/local_cluster.sh and export SLURM_CONF")
    subprocess.run(["sinfo"], check=True, capture_output=True)


def job_results(out_dir: Path) -> dict:
    """The loss_free arm's results file of a CPU job whose output directory is ``out_dir``."""
    return json.loads((out_dir / "results" / "loss_free.json").read_text())


def assert_resumed_to_the_same_end(resumed_dir: Path, reference_dir: Path) -> None:
    """The preempted job finished every step with the uninterrupted job's biases and balancer state.

    Same data position, RNG and balancer schedule after the resume: the biases are bit-identical.
    """
    resumed, reference = job_results(resumed_dir), job_results(reference_dir)
    assert resumed["finished"] and resumed["steps_done"] == reference["steps_done"], (
        f"resumed job: finished={resumed['finished']}, steps_done={resumed['steps_done']} "
        f"(uninterrupted: {reference['steps_done']})")
    assert resumed["final_bias"] == reference["final_bias"], (
        f"final biases differ:\n resumed       {resumed['final_bias']}\n uninterrupted {reference['final_bias']}")
    assert resumed["balancer_state"] == reference["balancer_state"], (
        f"balancer states differ:\n resumed       {resumed['balancer_state']}\n"
        f" uninterrupted {reference['balancer_state']}")
