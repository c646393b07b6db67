"""Count, on any device, the calls that make a GPU's host wait for the device.

On a GPU the host stalls until the device has finished its queued work when
it needs a value or a size from the device: reading a tensor back (``item``,
``tolist``, a tensor in an ``if``, ``float()``, ``.cpu()``, printing),
operations whose output size depends on the data (``nonzero``,
``masked_select``, ``unique``, boolean-mask indexing, ...) and copies of
host data onto the device (``torch.tensor(data, device=...)`` from pageable
memory). On the CPU nothing waits, so ``HostSyncCounter`` records the calls
themselves: a ``TorchFunctionMode`` sees every torch function and Tensor
method called while it is active. What it cannot see on the CPU: ``.to()``
or ``copy_`` of a CPU tensor onto a GPU (every tensor is on the CPU there).

On a GPU, check the same code with PyTorch's own detector, which raises on
every synchronising CUDA call::

    torch.cuda.set_sync_debug_mode("error")
    balancer.step()                       # a step that records no metrics
    torch.cuda.set_sync_debug_mode("default")
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_READ_BACK = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
    torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.__complex__, torch.Tensor.numpy,
    torch.Tensor.cpu, torch.Tensor.__repr__, torch.Tensor.__format__, torch.Tensor.__str__,
    torch.equal, torch.allclose, torch.is_nonzero,
}
# Output size decided by the data: the host must learn it before allocating.
_DATA_DEPENDENT_SIZE = {
    torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.Tensor.argwhere, torch.masked_select,
    torch.Tensor.masked_select, torch.unique, torch.Tensor.unique, torch.unique_consecutive,
    torch.Tensor.unique_consecutive, torch.bincount, torch.Tensor.bincount,
}
_HOST_DATA = {torch.tensor, torch.as_tensor}


def _is_bool_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _syncs(func, args, kwargs) -> bool:
    if func in _READ_BACK or func in _DATA_DEPENDENT_SIZE:
        return True
    if func in _HOST_DATA:
        # Host data placed on the model's device (torch.full and friends do not copy).
        return kwargs.get("device") is not None
    if func is torch.Tensor.to:  # to the host (a read-back when the tensor is on a GPU)
        targets = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device))]
        return any(torch.device(t).type == "cpu" for t in targets)
    if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_,
                torch.Tensor.index_put):
        return len(args) > 1 and _is_bool_mask(args[1])
    if func is torch.where:
        return len(args) + len(kwargs) == 1  # where(condition) is nonzero
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    return False


class HostSyncCounter(TorchFunctionMode):
    """Records synchronising calls while active: ``counter.calls`` (function names, in order), ``counter.total``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self.calls.append(getattr(func, "__name__", None) or repr(func))
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return len(self.calls)

    def summary(self) -> dict[str, int]:
        return dict(Counter(self.calls))
