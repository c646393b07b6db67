"""Auxiliary-loss-free load balancing for Megatron-Core MoE (Wang et al. 2024).

Public names are imported lazily: the CPU mode,
``nemo_lossfree.integrations.cpu.enable()`` (also reachable as
``nemo_lossfree.testing.cpu.enable()``), must be able to run before anything
imports Megatron-Core's router module (its ``jit_fuser`` is chosen at import
time).
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "LossFreeConfig": "nemo_lossfree.config",
    "LossFreeRouter": "nemo_lossfree.router",
    "LossFreeBalancer": "nemo_lossfree.balancer",
    "use_loss_free_router": "nemo_lossfree.spec",
    "compute_bias_update": "nemo_lossfree.update",
    "max_violation": "nemo_lossfree.metrics",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'nemo_lossfree' has no attribute {name!r}")
