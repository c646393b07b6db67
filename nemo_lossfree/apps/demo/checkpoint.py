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
Crash safety: a checkpoint is written into ``<root>/<A>/.iter_<n>.tmp``, gets a
``manifest.json`` (every file's size and SHA-256) and only then is renamed to
``iter_<n>``; ``<root>/<A>/latest`` names it after the rename. A rank killed
mid-save leaves a ``.tmp`` directory that nothing reads (the next save of that
step replaces it). On resume, a newest checkpoint whose files do not match its
manifest (truncated, corrupt, missing) gets one line naming it, and the run
resumes from the newest intact one; with none intact it starts from step 0
only if no checkpoint was ever published, else it refuses with the path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from nemo_lossfree.apps.demo.trainer import ArmTrainer, StepRecord

LATEST = "latest"
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint root that cannot be resumed from (one line for the user)."""
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


def _files(directory: Path) -> dict[str, dict]:
    """Every file under ``directory`` but the manifest: size and SHA-256."""
    found = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        found[str(path.relative_to(directory))] = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    return found


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def problem(directory: Path) -> Optional[str]:
    """Why ``directory`` is not an intact checkpoint (None when it is)."""
    manifest = directory / MANIFEST
    if not directory.is_dir():
        return "does not exist"
    try:
        recorded = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST} (not a finished save)"
    actual = _files(directory)
    for name, want in recorded.items():
        got = actual.get(name)
        if got is None:
            return f"{name} is missing"
        if got != want:
            return (f"{name} has {got['bytes']} bytes, sha256 {got['sha256'][:12]}; "
                    f"the save wrote {want['bytes']}, {want['sha256'][:12]}")
    return None


def save(trainer: ArmTrainer, root: str) -> Path:
    """Collective: every rank calls it after the same step."""
    from megatron.core import dist_checkpointing

    from nemo_lossfree.integrations.cpu import cuda_allocations_on_cpu

    arm = arm_dir(root, trainer.arm.name)
    name = f"iter_{trainer.step:07d}"
    directory, tmp = arm / name, arm / f".{name}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving this step
        tmp.mkdir(parents=True)
    dist.barrier()
    for attempt in range(1, SAVE_ATTEMPTS + 1):
        try:
            with cuda_allocations_on_cpu():
                dist_checkpointing.save(_sharded_state(trainer, is_loading=False), str(tmp))
            break
        except CheckpointException as exc:
            # Every rank raises together (megatron broadcasts the failure). Seen
            # once on a heavily loaded machine: the writer's result was missing.
            print(f"checkpoint save to {tmp} failed (attempt {attempt}): {exc!r}",
                  file=sys.stderr, flush=True)
            if attempt == SAVE_ATTEMPTS:
                raise
            dist.barrier()
            if dist.get_rank() == 0:
                shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            dist.barrier()
    dist.barrier()
    if dist.get_rank() == 0:
        _publish(tmp, directory)
    dist.barrier()
    return directory


def _publish(tmp: Path, directory: Path) -> None:
    """Manifest, rename, then ``latest``: each step durable before the next."""
    manifest = tmp / MANIFEST
    manifest.write_text(json.dumps({"files": _files(tmp)}, indent=1) + "\n")
    for path in (*(p for p in tmp.rglob("*") if p.is_file()), tmp):
        _fsync(path)
    if directory.exists():  # the same step saved again (a resumed run's final save)
        shutil.rmtree(directory)
    os.rename(tmp, directory)
    _fsync(directory.parent)
    marker = directory.parent / f".{LATEST}.tmp"
    marker.write_text(directory.name + "\n")
    os.replace(marker, directory.parent / LATEST)
    _fsync(directory.parent)


def latest(root: str, arm: str) -> Optional[Path]:
    """The newest intact checkpoint of ``arm`` (None when none was ever published).

    Each rank decides from the same files, so all ranks resume from the same one.
    """
    marker = arm_dir(root, arm) / LATEST
    if not marker.exists():
        return None
    newest = arm_dir(root, arm) / marker.read_text().strip()
    candidates = [newest] + sorted(
        (p for p in arm_dir(root, arm).glob("iter_*") if p.is_dir() and p.name < newest.name), reverse=True
    )
    skipped = []
    for directory in candidates:
        why = problem(directory)
        if why is None:
            if skipped and (not dist.is_initialized() or dist.get_rank() == 0):
                print(f"checkpoint {skipped[0][0]}: {skipped[0][1]}; resuming from {directory}",
                      file=sys.stderr, flush=True)
            return directory
        skipped.append((directory, why))
    raise CheckpointError(f"checkpoint {newest}: {skipped[0][1]}; no intact checkpoint under {arm_dir(root, arm)}")


def load(trainer: ArmTrainer, directory: Path) -> None:
    """Restore everything ``save`` wrote into a freshly built trainer."""
    from megatron.core import dist_checkpointing

    from nemo_lossfree.integrations.cpu import cuda_allocations_on_cpu

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
