"""Run Megatron-Bridge 0.6.2's own training loop on the CPU (gloo), for the CI lane.

Megatron-Core runs on the CPU under ``nemo_lossfree.testing.cpu.enable()``.
Megatron-Bridge's loop additionally assumes CUDA in a few fixed places; this
module redirects exactly those and nothing else:

- ``initialize_megatron`` asserts ``torch.cuda.is_available()`` unless called
  with ``allow_no_cuda=True`` (an argument it has, which ``setup`` does not
  pass): ``setup`` gets a version with ``allow_no_cuda=True``.
- tensors created with ``device="cuda"`` and ``Tensor.cuda()`` /
  ``.to("cuda")`` (batch moves in ``gpt_step``/``batch_utils``, loss and flag
  tensors in ``train``/``train_utils``/``loaders``): a ``TorchFunctionMode``
  rewrites the device to the CPU.
- ``torch.cuda.empty_cache`` and the memory statistics used for logging: no-ops
  returning empty/zero statistics.
- ``_set_random_seed`` seeds the model-parallel RNG streams only when a GPU
  is counted: it is told one is, for that call only (the streams live in
  ``nemo_lossfree.testing.cpu``'s CPU tracker).
- ``compile_helpers`` (``make`` of Megatron's dataset helpers): skipped, the
  wheel ships them compiled but without the Makefile (this one fails on GPU
  machines with a pip-installed megatron-core as well).

The model, optimizer, schedules, ``finalize_model_grads``, data pipeline,
checkpoint and logging code are Bridge's and Megatron-Core's, unmodified.
"""

from __future__ import annotations

import functools

import torch

_installed = False


def install() -> None:
    """Call before importing Megatron-Core / Megatron-Bridge (idempotent)."""
    global _installed
    if _installed:
        return
    from nemo_lossfree.testing import cpu

    cpu.enable(force=True)  # the lane runs on the CPU even where a GPU is present
    cpu.CudaAllocationsOnCpu().__enter__()  # for the whole process
    torch.cuda.empty_cache = lambda: None
    torch.cuda.memory_stats = lambda device=None: {}
    torch.cuda.memory_allocated = lambda device=None: 0
    torch.cuda.max_memory_allocated = lambda device=None: 0
    torch.cuda.memory_reserved = lambda device=None: 0
    torch.cuda.max_memory_reserved = lambda device=None: 0
    torch.cuda.reset_peak_memory_stats = lambda device=None: None

    from megatron.bridge.training import initialize, setup

    setup.initialize_megatron = functools.partial(initialize.initialize_megatron, allow_no_cuda=True)
    initialize._set_random_seed = cpu.seeding_the_cpu_tracker(initialize._set_random_seed)
    # Not CPU-specific: initialize_megatron runs `make` in megatron/core/datasets,
    # but the megatron-core wheel ships the compiled helpers_cpp and no Makefile,
    # so the make fails (on GPUs too). Use the shipped module.
    import megatron.core.datasets.helpers_cpp  # noqa: F401  (fails loudly if absent)

    initialize.compile_helpers = lambda: None
    _installed = True
