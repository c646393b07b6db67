"""What every launcher of the training entry points needs: the command line, the environment, a port.

One home for both launchers we support: ``nemo-lossfree slurm`` (our sbatch
script, ``apps/slurm``) and NeMo-Run (``integrations/nemo_run``); the demo's
own launcher and the tests' one-host runs take their rendezvous port from here.
Imports nothing heavy: launchers start in a plain interpreter.
"""

from __future__ import annotations

import socket
from typing import Any, Mapping, Optional, Sequence

#: The NeMo framework (Megatron-Bridge) entry point with the ``lossfree`` flag.
PRETRAIN_MODULE = "nemo_lossfree.integrations.bridge.pretrain"

# Megatron-Core on GPUs. Values a site already sets win (${VAR:-default}),
# except CUDA_DEVICE_MAX_CONNECTIONS, which Megatron requires.
GPU_ENV = [
    ("CUDA_DEVICE_MAX_CONNECTIONS", "1",
     "Megatron: one hardware queue keeps TP/SP communication kernels ahead of the compute they overlap"),
    ("NCCL_DEBUG", "${NCCL_DEBUG:-WARN}", "NCCL problems show up in the log"),
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}",
     "a failed collective ends the job instead of hanging until the time limit"),
    ("TORCH_NCCL_AVOID_RECORD_STREAMS", "${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}",
     "frees communication buffers promptly (lower peak memory)"),
    ("NCCL_IB_TIMEOUT", "${NCCL_IB_TIMEOUT:-19}", "tolerate transient InfiniBand stalls at scale"),
]
# CPU ranks talk over gloo; one math thread each, or they fight for the cores.
CPU_ENV = [
    ("OMP_NUM_THREADS", "${OMP_NUM_THREADS:-1}", "one math thread per rank (ranks share the cores)"),
]
COMMON_ENV = [
    ("PYTHONUNBUFFERED", "1", "metrics reach the log as they are printed"),
]
# Signals torchrun catches and passes on to its ranks (read by torchrun from
# PET_SIGNALS_TO_HANDLE, the env form of --signals-to-handle; older torchruns
# without the option ignore it). Without SIGUSR1 here, torchrun dies of the
# checkpoint request instead of passing it on.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def job_env(gpus_per_node: int) -> list[tuple[str, str, str]]:
    """``(name, value, why)`` for a job's environment; values may use ``${VAR:-default}``."""
    return (GPU_ENV if gpus_per_node else CPU_ENV) + COMMON_ENV


def pretrain_args(config_file: str, overrides: Sequence[str], config: Mapping[str, Any],
                  recipe: Optional[str] = None) -> list[str]:
    """``-m nemo_lossfree.integrations.bridge.pretrain [--recipe R] --config-file FILE [overrides]``.

    The arguments after the interpreter. A requeued job must resume: when the
    config saves checkpoints but names no load directory, load from the save
    directory.
    """
    command = ["-m", PRETRAIN_MODULE]
    if recipe:
        command += ["--recipe", recipe]
    command += ["--config-file", config_file]
    checkpoint = config.get("checkpoint") or {}
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint: must be a mapping (a YAML section), got {type(checkpoint).__name__}")
    extra = list(overrides)
    if checkpoint.get("save") and not checkpoint.get("load") \
            and not any(o.startswith("checkpoint.load=") for o in extra):
        extra.append(f"checkpoint.load={checkpoint['save']}")
    return command + extra


def free_port() -> int:
    """A port on 127.0.0.1 that nobody listens on right now (for a one-host rendezvous).

    Only free until someone binds it: callers that race (two demos started at
    once) retry on ``EADDRINUSE``.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
