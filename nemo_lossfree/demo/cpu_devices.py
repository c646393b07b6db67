"""Run Megatron-Core's ``device="cuda"`` allocations on the CPU (demo only).

``nemo_lossfree.testing.cpu.enable()`` shims ``torch.cuda.current_device()``
and streams, but a few places in megatron-core 0.19.2 hard-code
``device="cuda"``: the token counter of every pipeline schedule
(``schedules.py``), ``FP32Optimizer.__init__`` and the optimizer's grad-norm
group flag (``optimizer.py``). This TorchFunctionMode rewrites such a
``device`` argument to the CPU while it is active; the demo enters it only
around the schedule call and the optimizer's construction and step.

Workaround: this belongs in ``nemo_lossfree.testing.cpu`` (see the demo's
notes); it is here until the shim carries it.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaAllocationsOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


def cuda_allocations_on_cpu():
    """Context manager; a no-op when CUDA is really there."""
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    return _CudaAllocationsOnCpu()
