"""Run the series' GPU-style unit tests on the CPU (check.sh copies this in).

Megatron's tests move modules and tensors with ``.cuda()``; without a GPU this
conftest turns those into no-ops and applies the project's CPU shim (gloo,
CPU RNG tracker, no CUDA streams, jit_fuser off) before any test module
imports ``megatron.core.transformer``. Nothing here is used on a GPU machine.
"""

import torch

if not torch.cuda.is_available():
    from nemo_lossfree.testing import cpu

    cpu.enable()
    torch.nn.Module.cuda = lambda self, device=None: self
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
