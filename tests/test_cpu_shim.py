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
        from megatron.core.optimizer import optimizer
        assert schedules.torch is torch and optimizer.torch is torch
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


def test_megatron_optimizer_steps_and_clips_on_cpu(single_rank):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from nemo_lossfree.testing.models import gpt_moe_model, moe_transformer_config

    config = moe_transformer_config(num_layers=1, num_experts=4)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), gpt_moe_model(config, vocab_size=32))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1e-3), [ddp])
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).unsqueeze(0).expand(2, 16)
    ddp.zero_grad_buffer()
    ddp(ids, pos, None, labels=ids).float().mean().backward()
    ddp.finish_grad_sync()
    before = [p.detach().clone() for p in ddp.parameters()]
    ok, grad_norm, _ = optimizer.step()
    assert ok and grad_norm > 1e-3  # the norm before clipping
    clipped = torch.sqrt(sum((p.main_grad.float() ** 2).sum() for p in ddp.parameters()))
    assert clipped.item() <= 1e-3 * 1.001
    assert any(not torch.equal(b, p) for b, p in zip(before, ddp.parameters()))


def test_seeding_the_cpu_tracker_seeds_megatrons_model_parallel_streams(single_rank):
    """megatron.training's _set_random_seed skips the tracker with no CUDA device; the wrapper
    (Megatron-LM's and Bridge's CPU harnesses use it) seeds it."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from megatron.training import initialize

    from nemo_lossfree.testing.cpu import seeding_the_cpu_tracker

    def draw():
        with get_cuda_rng_tracker().fork():
            return torch.rand(4)

    seeded = seeding_the_cpu_tracker(initialize._set_random_seed)
    seeded(1234)
    first = draw()
    seeded(1234)
    assert torch.equal(draw(), first)
    initialize._set_random_seed(1234)  # upstream alone leaves the tracker's stream where it was
    assert not torch.equal(draw(), first)
    assert seeded.__wrapped__ is initialize._set_random_seed


def test_cuda_allocations_on_cpu_rewrites_devices():
    from nemo_lossfree.testing.cpu import cuda_allocations_on_cpu

    with cuda_allocations_on_cpu():
        made = torch.zeros(2, device="cuda")
        moved = torch.ones(2).cuda()
        converted = torch.ones(2).to("cuda")
    assert {t.device.type for t in (made, moved, converted)} == {"cpu"}


def test_megatron_groups_share_the_default_groups_timeout(single_rank):
    # A gloo connection that never completes while a group is created surfaces
    # as gloo's "Connect timeout" after the group's timeout: the same
    # init_distributed(timeout_s=...) as the default group, not Megatron's 30 min.
    import torch.distributed as dist
    from megatron.core import parallel_state

    def timeout_s(group):
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()

    default = timeout_s(dist.group.WORLD)
    assert default == 300
    for group in (parallel_state.get_data_parallel_group(), parallel_state.get_expert_model_parallel_group(),
                  parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)):
        assert timeout_s(group) == default
