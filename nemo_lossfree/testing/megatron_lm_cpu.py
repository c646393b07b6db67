"""Run a Megatron-LM training script (``megatron.training.pretrain``) on the CPU with gloo.

    torchrun --nproc-per-node 2 -m nemo_lossfree.testing.megatron_lm_cpu \\
        examples/pretrain_gpt_lossfree.py --distributed-backend gloo --transformer-impl local ...

For CI and laptops: the script runs unchanged, as ``__main__``, after the
shims below. Megatron-Core's model, optimizer, schedules,
``finalize_model_grads``, data pipeline, checkpointing and logging are the
wheel's own. ``nemo_lossfree.testing.cpu.enable()`` covers Megatron-Core;
``megatron.training`` (megatron-core 0.19.2) needs three things more, and
nothing else:

- ``initialize_megatron`` asserts ``torch.cuda.is_available()`` unless called
  with ``allow_no_cuda=True``, which ``pretrain()`` does not pass: it gets
  ``allow_no_cuda=True``.
- ``_initialize_distributed`` builds Megatron's parallel groups, and
  ``_set_random_seed`` seeds the model-parallel RNG streams, only when
  ``torch.cuda.device_count() > 0``: during ``initialize_megatron`` one device
  is counted and ``torch.cuda.set_device`` does nothing (the process group is
  gloo, from ``--distributed-backend gloo``; the streams live in
  ``testing.cpu``'s CPU tracker).
- ``device="cuda"`` allocations, ``Tensor.cuda()`` and ``.to("cuda")`` all over
  ``pretrain()`` (start-time all-reduce, ``get_model``'s ``.cuda()``, the batch,
  loss and logging tensors): ``testing.cpu.CudaAllocationsOnCpu`` for the whole
  process.

Flags the CPU needs (the local, non-fused implementations): ``--transformer-impl
local --no-persist-layer-norm --no-gradient-accumulation-fusion
--no-masked-softmax-fusion --no-bias-dropout-fusion --no-rope-fusion
--use-cpu-initialization``; see tests/test_megatron_lm_example.py.
"""

from __future__ import annotations

import contextlib
import functools
import runpy
import sys

import torch

_USAGE = "usage: python -m nemo_lossfree.testing.megatron_lm_cpu SCRIPT.py [script arguments...]"


@contextlib.contextmanager
def _one_device_counted():
    """Megatron's initialisation sees one device; selecting it does nothing."""
    saved = torch.cuda.device_count, torch.cuda.set_device
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None
    try:
        yield
    finally:
        torch.cuda.device_count, torch.cuda.set_device = saved


def install() -> None:
    """The shims above; call before ``megatron.training`` runs anything."""
    from nemo_lossfree.testing import cpu

    if not cpu.enable():
        raise SystemExit(
            "nemo_lossfree.testing.megatron_lm_cpu: CUDA is available; run the script with torchrun directly"
        )
    from megatron.training import training

    original = training.initialize_megatron

    @functools.wraps(original)
    def initialize_megatron_on_cpu(*args, **kwargs):
        with _one_device_counted():
            return original(*args, **{**kwargs, "allow_no_cuda": True})

    training.initialize_megatron = initialize_megatron_on_cpu
    cpu.CudaAllocationsOnCpu().__enter__()  # for the whole process, never left


def main(argv: list[str]) -> None:
    if not argv or not argv[0].endswith(".py"):
        raise SystemExit(_USAGE)
    install()
    sys.argv = list(argv)  # the script parses its own arguments
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
