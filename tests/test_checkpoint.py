"""megatron.core.dist_checkpointing round trips of the expert bias and balancer state."""

import pytest
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


RESUME_CONFIGS = {
    # Mid-schedule with the drift integral on (inverse-time rate: the step matters).
    "integral": dict(update_rule="proportional", update_rate=0.05, schedule="inverse_time", decay_steps=2,
                     integral_gain=0.5, integral_decay=0.9),
    # The quantile rule with the adaptive gain (gain, previous, seen).
    "adaptive": dict(schedule="adaptive"),
}


@pytest.mark.parametrize("name", sorted(RESUME_CONFIGS))
def test_the_models_own_checkpoint_resumes_the_balancer_bit_exactly(tmp_path, name):
    # Before: the step counter, integral and adaptive gain lived in the
    # balancer; a model-only checkpoint restarted them (step 0, zero integral).
    results = run_on_ranks(dist_workers.resume_mid_schedule, 2, str(tmp_path / "ckpt"), RESUME_CONFIGS[name],
                           expert_model_parallel_size=2)
    state_keys = {"integral": ["integral"], "adaptive": ["gain", "previous", "seen"]}[name]
    for result in results:
        assert result["steps_at_load"] == 3 and result["steps"] == (6, 6)
        for saved in result["at_save"]:
            assert int(saved["steps"]) == 3
            assert all(saved[key].abs().sum() > 0 for key in state_keys)  # mid-schedule, not the initial state
        for straight, resumed in zip(result["straight"], result["resumed"], strict=True):
            for key, value in straight.items():
                assert torch.equal(resumed[key], value), key
    # Replicas of a router agree across the EP ranks.
    for mine, other in zip(results[0]["resumed"], results[1]["resumed"]):
        assert torch.equal(mine["bias"], other["bias"])
