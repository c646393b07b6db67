"""The CPU shim is opt-in and inert where CUDA exists."""

import subprocess
import sys
import textwrap

import torch

from nemo_lossfree.testing.cpu import CpuRNGStatesTracker


def test_enable_changes_nothing_when_cuda_is_available():
    script = textwrap.dedent(
        """
        import torch
        torch.cuda.is_available = lambda: True  # pretend to be a GPU machine
        before = (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.get_rng_state)
        from nemo_lossfree.testing import cpu
        assert cpu.enable() is False
        assert (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.get_rng_state) == before
        from megatron.core import jit
        from megatron.core.pipeline_parallel import schedules
        assert jit.jit_fuser is not jit.noop_decorator
        assert schedules.torch is torch
        print("inert")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("inert")


def test_enable_is_active_on_this_cpu_machine():
    from megatron.core import jit
    from megatron.core.transformer import utils

    from nemo_lossfree.testing import cpu

    assert cpu.is_enabled()
    assert jit.jit_fuser is jit.noop_decorator
    assert torch.cuda.current_device() == torch.device("cpu")
    assert utils.get_default_causal_mask(4).device.type == "cpu"


def test_rng_tracker_forks_reproducible_streams():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    outside = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        first = torch.rand(3)
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside)  # the default stream is untouched
    fresh = CpuRNGStatesTracker()
    fresh.add("model-parallel-rng", 7)
    with fresh.fork("model-parallel-rng"):
        again = torch.cat([torch.rand(3), torch.rand(3)])
    assert torch.equal(torch.cat([first, second]), again)  # the stream continues across forks
