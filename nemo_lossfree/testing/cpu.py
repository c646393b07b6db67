"""The CPU mode under its public test-support name; it lives in ``nemo_lossfree.integrations.cpu``.

``nemo_lossfree.testing.cpu.enable()`` keeps working for tests, benchmarks,
examples and users' scripts; the package itself imports the integration.
"""

from nemo_lossfree.integrations.cpu import (
    CpuRNGStatesTracker,
    CudaAllocationsOnCpu,
    clip_grad_by_total_norm_on_cpu,
    cuda_allocations_on_cpu,
    enable,
    init_distributed,
    is_enabled,
    seeding_the_cpu_tracker,
)

__all__ = [
    "CpuRNGStatesTracker",
    "CudaAllocationsOnCpu",
    "clip_grad_by_total_norm_on_cpu",
    "cuda_allocations_on_cpu",
    "enable",
    "init_distributed",
    "is_enabled",
    "seeding_the_cpu_tracker",
]
