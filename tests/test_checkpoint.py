"""megatron.core.dist_checkpointing round trips of the expert bias and balancer state."""

import torch

from nemo_lossfree.testing.distributed import run_on_ranks

from _support import dist_workers


def assert_bit_exact(result):
    assert set(result["saved"]) == set(result["restored"])
    assert len(result["saved"]) == 2
    for key, saved in result["saved"].items():
        assert saved.abs().sum() > 0, key  # trained: not the zero initial bias
        assert torch.equal(result["restored"][key], saved), key
    assert result["dtypes"] == ["torch.float32"]


def test_save_and_load_restores_biases_and_step(tmp_path):
    results = run_on_ranks(
        dist_workers.save_then_load, 2, str(tmp_path / "ckpt"), False, expert_model_parallel_size=2
    )
    for result in results:
        assert_bit_exact(result)
        assert result["steps_done"] == 3


def test_upstream_expert_bias_checkpoint_loads_into_loss_free_router(tmp_path):
    results = run_on_ranks(
        dist_workers.save_then_load, 2, str(tmp_path / "ckpt"), True, expert_model_parallel_size=2
    )
    for result in results:
        assert_bit_exact(result)
