"""Save and resume one arm through ``megatron.core.dist_checkpointing``.

A checkpoint of arm A at step n is the directory ``<root>/<A>/iter_<n>`` with
- ``model``: the model's sharded state dict (weights and every router's
  ``expert_bias``: the loss-free bias and Megatron's built-in one alike),
- ``optimizer``: Megatron's optimizer sharded state dict (Adam moments, step),
- ``rng``: each rank's CPU and model-parallel RNG states (a ``ShardedObject``),
- common state: the balancer's ``state_dict()`` (its step counter, which drives
  the update-rate schedule), the LR scheduler, the data position (the step:
  ``TrainData`` derives a step's batch from the seed and the step alone) and
  the metric history for the plots.
``<root>/<A>/latest`` names the newest complete checkpoint; it is written last,
so a run killed while saving resumes from the previous one.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from nemo_lossfree.demo.trainer import ArmTrainer, StepRecord

from torch.distributed.checkpoint.api import CheckpointException

LATEST = "latest"
SAVE_ATTEMPTS = 3
FORMAT_VERSION = 1


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {
        "cpu": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(trainer: ArmTrainer, *, is_loading: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_sd = trainer.model.module.sharded_state_dict()
    rank, world = dist.get_rank(), dist.get_world_size()
    return {
        "model": model_sd,
        "optimizer": trainer.optimizer.sharded_state_dict(model_sd, is_loading=is_loading),
        "rng": ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0),
        "balancer": trainer.balancer.state_dict() if trainer.balancer is not None else None,
        "scheduler": trainer.scheduler.state_dict(),
        "step": trainer.step,
        "arm": trainer.arm.name,
        "history": [vars(r) for r in trainer.history],
        "format_version": FORMAT_VERSION,
    }


def arm_dir(root: str, arm: str) -> Path:
    return Path(root) / arm


def save(trainer: ArmTrainer, root: str) -> Path:
    """Collective: every rank calls it after the same step."""
    from megatron.core import dist_checkpointing

    from nemo_lossfree.testing.cpu import cuda_allocations_on_cpu

    directory = arm_dir(root, trainer.arm.name) / f"iter_{trainer.step:07d}"
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    for attempt in range(1, SAVE_ATTEMPTS + 1):
        try:
            with cuda_allocations_on_cpu():
                dist_checkpointing.save(_sharded_state(trainer, is_loading=False), str(directory))
            break
        except CheckpointException as exc:
            # Every rank raises together (megatron broadcasts the failure). Seen
            # once on a heavily loaded machine: the writer's result was missing.
            print(f"checkpoint save to {directory} failed (attempt {attempt}): {exc!r}",
                  file=sys.stderr, flush=True)
            if attempt == SAVE_ATTEMPTS:
                raise
            dist.barrier()
            if dist.get_rank() == 0:
                shutil.rmtree(directory)
                directory.mkdir(parents=True)
            dist.barrier()
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = arm_dir(root, trainer.arm.name) / f".{LATEST}.tmp"
        tmp.write_text(directory.name + "\n")
        os.replace(tmp, arm_dir(root, trainer.arm.name) / LATEST)
    dist.barrier()
    return directory


def latest(root: str, arm: str) -> Optional[Path]:
    marker = arm_dir(root, arm) / LATEST
    if not marker.exists():
        return None
    return arm_dir(root, arm) / marker.read_text().strip()


def load(trainer: ArmTrainer, directory: Path) -> None:
    """Restore everything ``save`` wrote into a freshly built trainer."""
    from megatron.core import dist_checkpointing

    from nemo_lossfree.testing.cpu import cuda_allocations_on_cpu

    with cuda_allocations_on_cpu():
        state = dist_checkpointing.load(_sharded_state(trainer, is_loading=True), str(directory))
    if state["arm"] != trainer.arm.name:
        raise ValueError(f"load: {directory} holds arm {state['arm']!r}, not {trainer.arm.name!r}")
    trainer.model.module.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.balancer is not None:
        trainer.balancer.load_state_dict(state["balancer"])
    _set_rng_state(state["rng"])
    trainer.step = int(state["step"])
    trainer.history = [StepRecord(**r) for r in state["history"]]
