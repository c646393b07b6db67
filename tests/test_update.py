import math

import pytest
import torch

from nemo_lossfree import LossFreeConfig
from nemo_lossfree.update import (
    MARGIN_BINS,
    compute_bias_update,
    compute_bias_update_with_integral,
    histogram_counts,
    scheduled_rate,
)


def _counts(layers=3, experts=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 500, (layers, experts), generator=g).float()


def test_sign_rule_is_bit_identical_to_megatron(single_rank):
    from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

    counts = _counts()
    bias = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    ours = compute_bias_update(counts, bias, rate=1e-3, rule="sign", center=False)
    # Megatron all-reduces in place over a group; a one-rank group leaves the counts as they are.
    theirs = get_updated_expert_bias(counts.clone(), bias, 1e-3)
    assert torch.equal(ours, theirs)


def test_sign_rule_moves_overloaded_experts_down():
    counts = torch.tensor([[10.0, 30.0, 20.0, 20.0]])
    bias = torch.zeros(1, 4)
    new = compute_bias_update(counts, bias, rate=0.5, rule="sign")
    assert new.tolist() == [[0.5, -0.5, 0.0, 0.0]]


def test_proportional_rule_scales_with_relative_error():
    counts = torch.tensor([[10.0, 30.0, 20.0, 20.0]])
    new = compute_bias_update(counts, torch.zeros(1, 4), rate=1.0, rule="proportional")
    assert torch.allclose(new, torch.tensor([[0.5, -0.5, 0.0, 0.0]]))
    # Scale-free: the same shares at 10x the tokens give the same step.
    assert torch.allclose(compute_bias_update(counts * 10, torch.zeros(1, 4), rate=1.0, rule="proportional"), new)


def test_layers_without_tokens_do_not_move():
    counts = torch.zeros(2, 4)
    bias = torch.tensor([[0.1, -0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    for rule in ("sign", "proportional"):
        assert torch.equal(compute_bias_update(counts, bias, rate=1.0, rule=rule), bias)


def test_centering_gives_mean_zero_and_changes_no_top_k_decision():
    counts = _counts(layers=2, experts=32, seed=3)
    bias = torch.randn(2, 32) + 5.0  # drifted, as in shipped checkpoints
    plain = compute_bias_update(counts, bias, rate=1e-2, rule="sign", center=False)
    centered = compute_bias_update(counts, bias, rate=1e-2, rule="sign", center=True)
    assert torch.allclose(centered.mean(dim=-1), torch.zeros(2), atol=1e-6)
    scores = torch.rand(4096, 32)
    for layer in range(2):
        top_plain = torch.topk(scores + plain[layer], k=4, dim=-1).indices.sort(dim=-1).values
        top_centered = torch.topk(scores + centered[layer], k=4, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(top_plain, top_centered)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="same shape"):
        compute_bias_update(torch.zeros(2, 4), torch.zeros(2, 5), rate=1.0)


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="rule: must be one of quantile, sign, proportional"):
        compute_bias_update(torch.zeros(4), torch.zeros(4), rate=1.0, rule="median")


def test_float64_counts_keep_a_float32_bias():
    counts = torch.tensor([2.0**25, 2.0**25 + 1, 2.0**25 - 1, 2.0**25], dtype=torch.float64)
    new = compute_bias_update(counts, torch.zeros(4), rate=1.0)
    assert new.dtype == torch.float32
    # Exact in float64: the +-1 differences survive (float32 would round them away).
    assert new.tolist() == [0.0, -1.0, 1.0, 0.0]


def test_constant_schedule():
    cfg = LossFreeConfig(update_rate=1e-3)
    assert [scheduled_rate(cfg, t) for t in (0, 10, 10_000)] == [1e-3] * 3


def test_inverse_time_schedule_halves_at_decay_steps():
    cfg = LossFreeConfig(update_rate=1e-2, schedule="inverse_time", decay_steps=100)
    assert scheduled_rate(cfg, 0) == pytest.approx(1e-2)
    assert scheduled_rate(cfg, 100) == pytest.approx(5e-3)
    assert scheduled_rate(cfg, 300) == pytest.approx(2.5e-3)
    floored = LossFreeConfig(update_rate=1e-2, schedule="inverse_time", decay_steps=100, min_update_rate=4e-3)
    assert scheduled_rate(floored, 300) == pytest.approx(4e-3)


def test_cosine_schedule_ends_at_the_floor():
    cfg = LossFreeConfig(update_rate=1e-2, schedule="cosine", decay_steps=100, min_update_rate=1e-3)
    assert scheduled_rate(cfg, 0) == pytest.approx(1e-2)
    assert scheduled_rate(cfg, 50) == pytest.approx(5.5e-3)
    assert scheduled_rate(cfg, 100) == pytest.approx(1e-3)
    assert scheduled_rate(cfg, 1000) == pytest.approx(1e-3)


def test_warmup_ramps_then_follows_the_schedule():
    cfg = LossFreeConfig(update_rate=1e-2, schedule="linear_warmup", warmup_steps=4)
    assert [scheduled_rate(cfg, t) for t in range(6)] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])
    decaying = LossFreeConfig(update_rate=1e-2, schedule="inverse_time", warmup_steps=4, decay_steps=10)
    assert scheduled_rate(decaying, 4) == pytest.approx(1e-2)
    assert scheduled_rate(decaying, 14) == pytest.approx(5e-3)


def test_freeze_sets_the_rate_to_zero():
    cfg = LossFreeConfig(update_rate=1e-3, freeze_after_steps=5)
    assert scheduled_rate(cfg, 4) == 1e-3
    assert scheduled_rate(cfg, 5) == 0.0
    assert scheduled_rate(cfg, 50) == 0.0


def test_negative_step_is_refused():
    with pytest.raises(ValueError, match="step: must be >= 0"):
        scheduled_rate(LossFreeConfig(), -1)


def test_integral_with_zero_gain_is_the_plain_update():
    gen = torch.Generator().manual_seed(3)
    counts = torch.randint(0, 500, (3, 16), generator=gen).double()
    bias = torch.randn(3, 16, generator=gen)
    integral = torch.randn(3, 16, generator=gen)
    for rule in ("sign", "proportional"):
        plain = compute_bias_update(counts, bias, rate=1e-2, rule=rule, center=True)
        with_zero, kept = compute_bias_update_with_integral(
            counts, bias, integral, rate=1e-2, rule=rule, center=True, gain=0.0, decay=0.9
        )
        assert torch.equal(with_zero, plain)
        assert torch.equal(kept, integral)


def test_integral_formula():
    counts = torch.tensor([[10.0, 30.0, 20.0, 20.0]])
    bias = torch.zeros(1, 4)
    integral = torch.tensor([[0.1, -0.1, 0.0, 0.0]])
    new_bias, new_integral = compute_bias_update_with_integral(
        counts, bias, integral, rate=1.0, rule="proportional", gain=0.5, decay=0.8
    )
    step = torch.tensor([[0.5, -0.5, 0.0, 0.0]])
    assert torch.allclose(new_integral, 0.8 * integral + 0.5 * step)
    assert torch.allclose(new_bias, step + new_integral)
    with pytest.raises(ValueError, match="counts, bias and integral must have the same shape"):
        compute_bias_update_with_integral(counts, bias, torch.zeros(4), rate=1.0, gain=0.5, decay=0.8)


def _drifting_router_maxvio(gain: float) -> float:
    """Top-2 of 8 experts whose scores drift apart a little every step (a router
    still learning), balanced by the proportional rule; mean MaxVio of the last 100 steps."""
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(4096, 8, generator=gen) * 0.2
    drift = torch.linspace(-1, 1, 8) * 4e-4  # per step
    bias = torch.zeros(8)
    integral = torch.zeros(8)
    vio = []
    for t in range(400):
        scores = base + t * drift
        chosen = torch.topk(scores + bias, 2, dim=1).indices
        counts = torch.bincount(chosen.flatten(), minlength=8).double()
        vio.append((counts.max() / counts.mean() - 1).item())
        bias, integral = compute_bias_update_with_integral(
            counts, bias, integral, rate=2e-3, rule="proportional", center=True, gain=gain, decay=0.97
        )
    return sum(vio[-100:]) / 100


def test_integral_follows_a_drifting_router():
    # The plain rule lags a drifting target by about drift / rate; the integral removes most of it.
    plain = _drifting_router_maxvio(0.0)
    tracked = _drifting_router_maxvio(0.1)
    assert plain > 0.15
    assert tracked < plain / 3


def test_float16_counts_past_its_largest_value_still_update():
    # The sum (80000) overflows float16 (max 65504): computed in float16 the mean
    # is inf and every bias NaN. Counts are computed in float64 whatever their dtype.
    counts = torch.tensor([[10000.0, 30000.0, 20000.0, 20000.0]], dtype=torch.float16)
    sign = compute_bias_update(counts, torch.zeros(1, 4), rate=0.5, rule="sign")
    assert sign.tolist() == [[0.5, -0.5, 0.0, 0.0]]
    proportional = compute_bias_update(counts, torch.zeros(1, 4), rate=1.0, rule="proportional")
    assert torch.allclose(proportional, torch.tensor([[0.5, -0.5, 0.0, 0.0]]))
    with_integral, _ = compute_bias_update_with_integral(
        counts, torch.zeros(1, 4), torch.zeros(1, 4), rate=1.0, rule="proportional", gain=0.5, decay=0.9
    )
    assert torch.isfinite(with_integral).all()


@pytest.mark.parametrize("rate", [math.nan, math.inf, -1e-3, "fast"])
def test_invalid_rates_are_refused(rate):
    counts = torch.tensor([[10.0, 30.0, 20.0, 20.0]])
    bias = torch.zeros(1, 4)
    message = r"^rate: must be a finite number >= 0, got "
    with pytest.raises(ValueError, match=message):
        compute_bias_update(counts, bias, rate=rate)
    for gain in (0.0, 0.5):
        with pytest.raises(ValueError, match=message):
            compute_bias_update_with_integral(counts, bias, torch.zeros(1, 4), rate=rate, gain=gain, decay=0.9)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_counts_keep_that_layers_bias_and_state(bad):
    # Raising here needed a host read of every step's counts (a GPU sync per
    # step); the layer keeps its bias and state instead, decided on the device.
    from nemo_lossfree.update import apply_update, update_state

    counts = torch.tensor([[10.0, 30.0, 20.0, 20.0], [1.0, 2.0, 3.0, 4.0]])
    counts[1, 2] = bad
    bias = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    for rule in ("sign", "proportional"):
        new = compute_bias_update(counts, bias, rate=1e-3, rule=rule, center=True)
        assert torch.equal(new[1], bias[1])
        assert torch.equal(new[0], compute_bias_update(counts[:1], bias[:1], rate=1e-3, rule=rule, center=True)[0])
    integral = torch.full((2, 4), 0.25)
    new, new_integral = compute_bias_update_with_integral(counts, bias, integral, rate=1e-3, gain=0.5, decay=0.9)
    assert torch.equal(new[1], bias[1]) and torch.equal(new_integral[1], integral[1])
    assert not torch.equal(new[0], bias[0]) and not torch.equal(new_integral[0], integral[0])
    # The quantile rule and the adaptive gain: a non-finite histogram entry counts too.
    histogram = torch.zeros(2, 4, 2, MARGIN_BINS)
    histogram[:, :, 0, 0] = 5.0
    histogram[:, :, 1, 0] = -1.0
    finite_counts = histogram_counts(histogram)
    histogram[1, 0, 1, 3] = bad
    for config in (LossFreeConfig(), LossFreeConfig(schedule="adaptive")):
        state = update_state(config, 2, 4)
        new, new_state, _ = apply_update(config, 0, finite_counts, bias, state, histogram)
        assert torch.equal(new[1], bias[1])
        assert all(torch.equal(new_state[key][1], state[key][1]) for key in state)
        assert torch.isfinite(new).all()
