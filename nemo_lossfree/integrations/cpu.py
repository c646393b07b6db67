"""Opt-in CPU mode for Megatron-Core: run GPT-MoE models with gloo, no GPU.

An integration with Megatron-Core's runtime, like the Megatron-LM and Bridge
ones beside it: Megatron-Core assumes CUDA in a few places that do not matter
for correctness on one host: ``torch.cuda.current_device()`` as an allocation
device, CUDA streams and events for overlap, and the CUDA RNG state tracker.
``enable()`` shims exactly those, and turns Megatron's ``jit_fuser``
(``torch.compile``) off, which otherwise costs ~15 s per process on the first
step. It is inert where CUDA is available (``enable()`` returns False and
changes nothing): this is for the demo, CPU jobs of the Bridge entry point,
tests and laptops, never for a GPU job.

Call ``enable()`` before anything imports ``megatron.core.transformer``.
``testing/cpu.py`` re-exports its public names, so the test-support path keeps working.
"""

from __future__ import annotations

import contextlib
import sys
import types
import warnings
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


class _NullStream:
    """Stands in for torch.cuda.Stream: every op runs in order on the CPU."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class _NullEvent:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


class CpuRNGStatesTracker:
    """Megatron's CudaRNGStatesTracker API over CPU generator states.

    ``fork(name)`` swaps the CPU default generator to the named state, so
    tensor-parallel and expert-parallel initialisation draw from separate,
    reproducible streams exactly as on GPUs.
    """

    def __init__(self, *args, **kwargs) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator()
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        original = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)


class _TorchOnCpu(types.ModuleType):
    """``torch`` for modules that allocate with a literal ``device="cuda"``.

    Megatron-Core's pipeline schedules and optimizers create small tensors
    with ``torch.zeros(..., device="cuda")``; inside those modules only,
    factory functions map a CUDA device to the CPU. Everything else is torch
    itself.
    """

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str):
        value = getattr(torch, name)
        if name in self._FACTORIES:

            def on_cpu(*args, _factory=value, **kwargs):
                device = kwargs.get("device")
                if device is not None and torch.device(device).type == "cuda":
                    kwargs["device"] = "cpu"
                return _factory(*args, **kwargs)

            return on_cpu
        return value


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class CudaAllocationsOnCpu(TorchFunctionMode):
    """Every ``device="cuda"``, ``Tensor.cuda()`` and ``.to("cuda")`` becomes the CPU.

    For code outside the modules ``enable()`` covers (Megatron-Bridge's
    training loop, dist_checkpointing's loaders); enter it around such calls,
    or for a whole CPU-only process.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


def cuda_allocations_on_cpu():
    """``CudaAllocationsOnCpu`` as a context manager; a no-op where CUDA is available."""
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    return CudaAllocationsOnCpu()


def enable(force: bool = False) -> bool:
    """Shim Megatron-Core's CUDA-only calls for CPU + gloo. Returns True if active.

    A no-op (returning False) when CUDA is available, unless ``force`` (tests
    of the shim itself on a GPU machine).
    """
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    if "megatron.core.transformer.moe.router" in sys.modules:
        warnings.warn(
            "nemo_lossfree.integrations.cpu.enable() ran after Megatron-Core's router was imported: "
            "its jit_fuser stays torch.compile (slow first step on the CPU)",
            RuntimeWarning,
            stacklevel=2,
        )
    from megatron.core import jit

    jit.disable_jit_fuser()

    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu  # allocation device for Megatron's buffers
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullEvent
    torch.cuda.current_stream = lambda device=None: _NullStream()
    torch.cuda.default_stream = lambda device=None: _NullStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None

    # The default causal mask is allocated with device="cuda" (and cached).
    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    @functools.lru_cache(maxsize=32)
    def causal_mask_on_cpu(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    transformer_utils.get_default_causal_mask = causal_mask_on_cpu
    fused_softmax.get_default_causal_mask = causal_mask_on_cpu

    import importlib

    from megatron.core.tensor_parallel import random as mp_random

    # Modules that allocate with a literal device="cuda": the schedules' token
    # counter, the optimizers' found-inf / grad-norm flags, grad clipping
    # and the grad-norm fallback kernels.
    for name in (
        "megatron.core.pipeline_parallel.schedules",
        "megatron.core.optimizer.optimizer",
        "megatron.core.optimizer.clip_grads",
        "megatron.core.utils",  # local_multi_tensor_l2_norm (no Apex or TE here)
    ):
        importlib.import_module(name).torch = _TorchOnCpu()

    # Gradient clipping asserts CUDA tensor types; clip the same way on the CPU.
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as megatron_optimizer

    megatron_optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_on_cpu
    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_on_cpu

    # There is no CUDA generator: its "state" is empty (the CPU state is
    # captured separately by Megatron's checkpointing and recompute code).
    no_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)  # noqa: E731
    ignore_state = lambda *args, **kwargs: None  # noqa: E731
    mp_random._get_cuda_rng_state = no_state
    mp_random._set_cuda_rng_state = ignore_state
    torch.cuda.get_rng_state = no_state
    torch.cuda.set_rng_state = ignore_state
    torch.cuda.get_rng_state_all = lambda: []
    torch.cuda.set_rng_state_all = ignore_state

    mp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mp_random.initialize_rng_tracker = _keep_cpu_tracker
    _ENABLED = True
    return True


def _keep_cpu_tracker(*args, force_reset: bool = False, **kwargs) -> None:
    from megatron.core.tensor_parallel import random as mp_random

    if force_reset or mp_random._CUDA_RNG_STATE_TRACKER is None:
        mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def seeding_the_cpu_tracker(set_random_seed):
    """``megatron.training``'s ``_set_random_seed`` (Megatron-LM's and Bridge's) that also seeds
    the model-parallel RNG tracker on the CPU.

    It seeds that tracker only when ``torch.cuda.device_count() > 0``; the CPU
    tracker stands in for the CUDA one, so it is seeded the same way.
    """
    import functools

    @functools.wraps(set_random_seed)
    def seeded(*args, **kwargs):
        device_count = torch.cuda.device_count
        torch.cuda.device_count = lambda: 1
        try:
            return set_random_seed(*args, **kwargs)
        finally:
            torch.cuda.device_count = device_count

    return seeded


def clip_grad_by_total_norm_on_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's clip_grad_by_total_norm_fp32 semantics without its CUDA-only checks."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(clip_coeff, torch.Tensor):
        clip_coeff = clip_coeff.clamp_max(1.0)
    elif clip_coeff >= 1.0:
        return
    for grad in grads:
        grad.detach().mul_(clip_coeff)


def is_enabled() -> bool:
    return _ENABLED


def init_distributed(
    rank: int,
    world_size: int,
    *,
    init_method: str,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout_s: Optional[float] = 300.0,
) -> None:
    """gloo process group + Megatron model-parallel groups + seeded RNG tracker.

    ``timeout_s`` bounds every group's collectives and connections, Megatron's
    groups included (their own default is 30 min): a rank whose gloo
    connection never completes fails with gloo's "Connect timeout" instead of
    hanging the job.
    """
    import datetime
    import math

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    enable()
    if not dist.is_initialized():
        dist.init_process_group(
            backend="gloo",
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s) if timeout_s else None,
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        create_gloo_process_groups=True,  # Megatron's optimizer asks for its gloo DP groups
        **({"distributed_timeout_minutes": math.ceil(timeout_s / 60)} if timeout_s else {}),
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
