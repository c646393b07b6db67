"""pytest plugin: a Megatron-LM checkout's GPU unit tests on the CPU, test files untouched.

    PYTHONPATH=<checkout>:patches/tools/harness/megatron_lm \
        python -m pytest -p megatron_lm_on_cpu tests/unit_tests/transformer/moe/test_routers.py

Megatron-LM's unit tests are written for one GPU per rank and NCCL: they skip
when CUDA is not available (``skipif(not torch.cuda.is_available())``, evaluated
when the test module is imported), move modules with ``.cuda()``, allocate with
``device="cuda"`` and start NCCL in ``tests/unit_tests/test_utilities.Utils``.
Loaded with ``-p`` (before the checkout's conftest files), this plugin

1. applies ``nemo_lossfree.testing.cpu.enable()`` (gloo-friendly CUDA stand-ins,
   CPU RNG tracker, ``jit_fuser`` off) before ``megatron.core.transformer`` is
   imported;
2. makes ``Module.cuda()`` / ``Tensor.cuda()`` no-ops and runs every test inside
   ``CudaAllocationsOnCpu`` (``device="cuda"`` and ``.to("cuda")`` mean the CPU),
   with ``torch.cuda.current_device()`` answering 0 to the test files' own code
   as on one GPU (so ``torch.device("cuda", torch.cuda.current_device())``
   builds; Megatron's code keeps the CPU device) and a bare ordinal
   (``device=0``) meaning the CPU too;
3. answers ``torch.cuda.is_available()`` with True while the tests are
   collected, so that the CUDA skip markers do not skip; while they run it is
   the real answer (False), so the code under test takes its CPU paths;
4. replaces ``Utils.initialize_distributed`` with the same rendezvous on gloo
   (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``; a free port when
   one process runs without ``MASTER_PORT``);
5. seeds the CPU shim's model-parallel RNG tracker in
   ``megatron.training.initialize._set_random_seed`` as it seeds the CUDA one
   on a GPU (it skips that when ``torch.cuda.device_count()`` is 0);
6. makes ``parallel_state.destroy_model_parallel`` also destroy the process
   groups it drops (each gloo group keeps threads alive; thousands after a few
   hundred tests);
7. makes the test-data download of the session fixture ``ensure_test_data`` a
   no-op: there is no network, and the MoE tests read nothing from /opt/data.

A test that still needs a GPU (Transformer Engine kernels, CUDA-only dtypes or
APIs) or more processes than were started fails, errors or skips here;
patches/README.md lists them by cause. On a GPU machine, load no plugin.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta

import pytest
import torch

from nemo_lossfree.testing import cpu

if torch.cuda.is_available():
    raise pytest.UsageError("megatron_lm_on_cpu: CUDA is available; run the tests without this plugin")

cpu.enable()
torch.nn.Module.cuda = lambda self, device=None: self
torch.Tensor.cuda = lambda self, *args, **kwargs: self

_real_is_available = torch.cuda.is_available


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _initialize_distributed_on_gloo():
    from tests.unit_tests.test_utilities import Utils

    if not torch.distributed.is_initialized() and Utils.rank >= 0:
        if Utils.world_size == 1 and "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = _free_port()
        address = os.getenv("MASTER_ADDR", "localhost")
        port = os.getenv("MASTER_PORT", "29500")
        torch.distributed.init_process_group(
            backend="gloo",
            init_method=f"tcp://{address}:{port}",
            world_size=Utils.world_size,
            rank=Utils.rank,
            timeout=timedelta(minutes=5),
        )
        torch.distributed.barrier()
    Utils.inited = True


def _destroying_groups(megatron_destroy):
    """``parallel_state.destroy_model_parallel`` that also destroys the process groups.

    Megatron drops its references to the model-parallel groups but leaves them registered
    with torch.distributed; NCCL groups cost little there, but every gloo group keeps its
    threads, and each test builds a new set (thousands of threads after a few hundred tests).
    """

    def destroy_model_parallel(*args, **kwargs):
        result = megatron_destroy(*args, **kwargs)
        if torch.distributed.is_initialized():
            from torch.distributed import distributed_c10d as c10d

            for group in list(c10d._world.pg_map):
                if group is not c10d.GroupMember.WORLD:
                    torch.distributed.destroy_process_group(group)
        return result

    return destroy_model_parallel


def _no_test_data_download(assets_dir) -> bool:
    print(f"megatron_lm_on_cpu: not downloading Megatron-LM's test data to {assets_dir} (no network)")
    return False


def _patch_checkout() -> None:
    # Now, at plugin import: the checkout's conftest files import these names
    # when pytest loads them, right after the plugins.
    import megatron.core.parallel_state as parallel_state
    from megatron.training import initialize
    from tests.test_utils.python_scripts import download_unit_tests_dataset
    from tests.unit_tests.test_utilities import Utils

    Utils.initialize_distributed = staticmethod(_initialize_distributed_on_gloo)
    parallel_state.destroy_model_parallel = _destroying_groups(parallel_state.destroy_model_parallel)
    initialize._set_random_seed = cpu.seeding_the_cpu_tracker(initialize._set_random_seed)
    download_unit_tests_dataset.download_and_extract_asset = _no_test_data_download


_patch_checkout()


@pytest.hookimpl(wrapper=True)
def pytest_collection(session):
    torch.cuda.is_available = lambda: True
    try:
        return (yield)
    finally:
        torch.cuda.is_available = _real_is_available


class _CudaOrdinalsOnCpu(cpu.CudaAllocationsOnCpu):
    """``CudaAllocationsOnCpu`` that also takes a bare device ordinal (``device=0``) as the CPU.

    While a test runs ``torch.cuda.current_device()`` answers 0 to the test's own code, as
    on one GPU, so that it can build ``torch.device("cuda", torch.cuda.current_device())``
    (the CPU shim's answer, the CPU device, is no index) or pass the ordinal as a device;
    an int device names a CUDA device, and there is none here.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_ordinal(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_ordinal(args[1]):
            args = (args[0], "cpu", *args[2:])
        return super().__torch_function__(func, types, args, kwargs)


def _is_ordinal(device) -> bool:
    return isinstance(device, int) and not isinstance(device, bool)


def _ordinal_for_test_code(current_device, tests_dir: str):
    """``torch.cuda.current_device`` that answers 0 to a test file, and as before to the rest.

    The code under test keeps the CPU shim's answer (the CPU device: its buffers, its
    ``.to(device=...)`` calls, also from the backward where no torch function mode reaches,
    stay as they were); only a test's own ``torch.device("cuda", torch.cuda.current_device())``
    gets an index.
    """

    def answer():
        caller = sys._getframe(1).f_code.co_filename
        return 0 if caller.startswith(tests_dir) else current_device()

    return answer


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    current_device = torch.cuda.current_device
    tests_dir = os.path.join(str(item.config.rootpath), "tests", "")
    torch.cuda.current_device = _ordinal_for_test_code(current_device, tests_dir)
    try:
        with _CudaOrdinalsOnCpu():
            return (yield)
    finally:
        torch.cuda.current_device = current_device
