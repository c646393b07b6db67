"""What a SLURM job runs: the training command built from a run config.

GPU clusters run the NeMo framework (Megatron-Bridge) entry point,
``python -m nemo_lossfree.integrations.bridge.pretrain --config-file FILE [overrides]``,
under torchrun. CPU clusters (``--gpus-per-node 0``) run the demo worker,
``python -m nemo_lossfree.apps.demo.worker``, with gloo; the config's ``model:``,
``train:``, ``optimizer:``, ``scheduler:``, ``rng:``, ``checkpoint:`` and
``lossfree:`` fields that the worker has become its flags (``worker_flags``),
so the same YAML drives both. Fields the small CPU model has no use for
(dense FFN width, vocabulary, dtypes, Bridge's dist/logger sections) are not
passed on.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Optional

# config key -> demo worker flag (nemo_lossfree.apps.demo.settings / worker).
MODEL_FLAGS = {
    "num_layers": "--layers",
    "hidden_size": "--hidden-size",
    "num_attention_heads": "--heads",
    "num_moe_experts": "--experts",
    "moe_router_topk": "--topk",
    "moe_ffn_hidden_size": "--moe-ffn-hidden-size",
    "moe_router_score_function": "--score-function",
    "seq_length": "--seq-length",
    "expert_model_parallel_size": "--expert-parallel",
}
TRAIN_FLAGS = {
    "train_iters": "--steps",
    "micro_batch_size": "--micro-batch-size",
}
OPTIMIZER_FLAGS = {
    "lr": "--lr",
    "min_lr": "--min-lr",
}
# Megatron-Bridge keeps the LR schedule in `scheduler:` and the seed in `rng:`.
SCHEDULER_FLAGS = {
    "lr_warmup_iters": "--lr-warmup-steps",
    "lr_decay_iters": "--lr-decay-steps",
}
RNG_FLAGS = {
    "seed": "--seed",
}
# Layouts the CPU demo model does not have: they must be 1 there.
CPU_UNSUPPORTED_PARALLEL = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "context_model_parallel_size",
)


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = config.get(name) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}: must be a mapping (a YAML section), got {type(value).__name__}")
    return value


def worker_arm(config: Mapping[str, Any]) -> str:
    """The demo arm that matches the config's balancing settings."""
    lossfree = _section(config, "lossfree")
    if lossfree.get("enabled", bool(lossfree)):
        return "loss_free"
    aux = _section(config, "model").get("moe_aux_loss_coeff", 0) or 0
    return "aux_loss" if aux > 0 else "none"


def worker_flags(config: Mapping[str, Any], *, world_size: int) -> list[str]:
    """The demo worker's model/training flags for a run config."""
    model = _section(config, "model")
    train = _section(config, "train")
    optimizer = _section(config, "optimizer")
    lossfree = _section(config, "lossfree")
    scheduler = _section(config, "scheduler")
    rng = _section(config, "rng")
    for key in CPU_UNSUPPORTED_PARALLEL:
        if model.get(key, 1) != 1:
            raise ValueError(
                f"model.{key}: the CPU demo worker runs expert parallelism only, so it must be 1 "
                f"with --gpus-per-node 0, got {model[key]!r}"
            )
    flags: list[str] = []
    tables = ((model, MODEL_FLAGS), (train, TRAIN_FLAGS), (optimizer, OPTIMIZER_FLAGS),
              (scheduler, SCHEDULER_FLAGS), (rng, RNG_FLAGS))
    for section, table in tables:
        for key, flag in table.items():
            if section.get(key) is not None:
                flags += [flag, str(section[key])]
    # Megatron's global batch = micro batch x micro-batches x data-parallel
    # replicas; the worker takes micro-batches per step. With expert
    # parallelism only, every rank is a data-parallel replica of the dense part.
    if train.get("global_batch_size") is not None:
        gbs = train["global_batch_size"]
        mbs = train.get("micro_batch_size", 1)
        if gbs % (mbs * world_size):
            raise ValueError(
                f"train.global_batch_size: must be a multiple of train.micro_batch_size x ranks "
                f"({mbs} x {world_size}), got {gbs}"
            )
        flags += ["--num-micro-batches", str(gbs // (mbs * world_size))]
    for key, value in lossfree.items():
        if key == "enabled":
            continue
        flags += ["--lossfree", f"{key}={_scalar(value)}"]
    return flags


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def cpu_worker_command(config: Mapping[str, Any], *, world_size: int, results_dir: str,
                       checkpoint_dir: str) -> list[str]:
    """``-m nemo_lossfree.apps.demo.worker ...`` (arguments after the interpreter).

    ``--load`` always points at the checkpoint directory: the worker resumes
    when a checkpoint is there (a requeued job) and starts fresh otherwise.
    """
    checkpoint = _section(config, "checkpoint")
    command = [
        "-m", "nemo_lossfree.apps.demo.worker",
        "--arm", worker_arm(config),
        "--out", results_dir,
        "--save", checkpoint_dir,
        "--load", checkpoint_dir,
        "--progress",
    ]
    if checkpoint.get("save_interval"):
        command += ["--save-interval", str(checkpoint["save_interval"])]
    return command + worker_flags(config, world_size=world_size)


def gpu_pretrain_command(config_file: str, overrides: list[str],
                         config: Mapping[str, Any], recipe: Optional[str] = None) -> list[str]:
    """``-m nemo_lossfree.integrations.bridge.pretrain [--recipe R] --config-file FILE [overrides]``.

    A requeued job must resume: when the config saves checkpoints but names
    no load directory, load from the save directory.
    """
    command = ["-m", "nemo_lossfree.integrations.bridge.pretrain"]
    if recipe:
        command += ["--recipe", recipe]
    command += ["--config-file", config_file]
    checkpoint = _section(config, "checkpoint")
    extra = list(overrides)
    if checkpoint.get("save") and not checkpoint.get("load") \
            and not any(o.startswith("checkpoint.load=") for o in extra):
        extra.append(f"checkpoint.load={checkpoint['save']}")
    return command + extra


def load_config(path: str, overrides: list[str]) -> dict[str, Any]:
    """The run config as nested dicts, overrides applied (``a.b=value``).

    ``nemo_lossfree.runconfig.load.load_run_config``, the one reader of run-config
    files: its ``RunConfigError`` (a ``ValueError``) names the file or key.
    """
    from nemo_lossfree.runconfig.load import load_run_config

    return load_run_config(path, list(overrides))


def default_python() -> str:
    """The interpreter for CPU jobs on this machine's cluster: the running one (its venv)."""
    return str(Path(sys.executable))
