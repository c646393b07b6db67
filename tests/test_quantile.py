"""The quantile rule: its math against upstream's qb_dual_update, the router's
margin histogram, and the balancer's step (group-limited, mixed expert counts,
padding, any T*K)."""

import math

import pytest
import torch

from nemo_lossfree import LossFreeBalancer, LossFreeConfig
from nemo_lossfree.megatron_compat import missing_upstream_feature
from nemo_lossfree.metrics import max_violation
from nemo_lossfree.router import LossFreeRouter
from nemo_lossfree.testing.models import moe_transformer_config
from nemo_lossfree.update import (
    MARGIN_BIN_SMALLEST,
    MARGIN_BINS,
    MARGIN_EDGES,
    compute_bias_update,
    margin_bins,
    margin_histogram,
    quantile_step,
    selection_margins,
)


def _route(scores_TE, bias_E, topk):
    biased_TE = scores_TE + bias_E
    selected_TE = torch.zeros_like(biased_TE, dtype=torch.bool)
    selected_TE.scatter_(1, torch.topk(biased_TE, topk, dim=1).indices, True)
    return biased_TE, selected_TE


def _histogram(scores_TE, bias_E, topk, weight_T=None, **margins):
    biased_TE, selected_TE = _route(scores_TE, bias_E, topk)
    return margin_histogram(selection_margins(biased_TE, selected_TE, topk, **margins), weight_T)


def _bin_of(values):
    return margin_bins(values.float())


def test_equals_qb_dual_update_where_the_bins_separate_the_tokens(single_rank):
    """One micro-batch on one rank, T*K divisible by E: upstream's quantile is exact there."""
    if why := missing_upstream_feature("quantile_balancing"):
        pytest.skip(why)  # the comparison arm; the rule itself is tested below on every minor
    from megatron.core.transformer.moe.moe_utils import qb_dual_update

    T, E, K = 32, 8, 2
    compared = 0
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        scores_TE = torch.rand(T, E, generator=gen)
        bias_E = torch.randn(E, generator=gen) * 0.05
        # Upstream subtracts its bias (select on S - beta); ours is added.
        _, beta_E = qb_dual_update(scores_TE, K, -bias_E)
        theirs_E = -beta_E
        hist = _histogram(scores_TE, bias_E, K, upstream_cutoff=True)
        ours_E = (bias_E.double() + quantile_step(hist)).float()

        # Where the bin holding upstream's value holds no other margin: equal to float32 rounding.
        biased_TE, selected_TE = _route(scores_TE, bias_E, K)
        margins_TE = selection_margins(biased_TE, selected_TE, K, upstream_cutoff=True)
        alone_E = (_bin_of(margins_TE) == _bin_of(theirs_E - bias_E)).sum(dim=0) == 1
        compared += int(alone_E.sum())
        assert torch.allclose(ours_E[alone_E], theirs_E[alone_E], rtol=0, atol=1e-7)
        # Elsewhere within the width of that bin (at most the margin itself: bins
        # double; the central bins are MARGIN_BIN_SMALLEST wide).
        bound_E = (theirs_E - bias_E).abs() + MARGIN_BIN_SMALLEST
        assert ((ours_E - theirs_E).abs() <= bound_E).all()
    assert compared >= 10  # the test must compare something


def test_full_step_balances_the_same_batch_for_any_token_count():
    """T*K need not be divisible by E: after one full step the batch is balanced."""
    gen = torch.Generator().manual_seed(1)
    for T, E, K in ((4096, 16, 2), (999, 16, 3), (5000, 64, 6), (3000, 8, 1)):
        popularity_E = torch.randn(E, generator=gen) * 0.5
        scores_TE = torch.sigmoid(torch.randn(T, E, generator=gen) + popularity_E)
        bias_E = torch.zeros(E)
        _, selected = _route(scores_TE, bias_E, K)
        before = float(max_violation(selected.sum(0).double()))
        hist = _histogram(scores_TE, bias_E, K)
        counts_E = selected.sum(0).double()
        new_E = compute_bias_update(counts_E, bias_E, rate=1.0, rule="quantile", histogram=hist)
        _, selected = _route(scores_TE, new_E, K)
        after = float(max_violation(selected.sum(0).double()))
        assert before > 0.3
        # Coordinate steps taken together overshoot a little; far below the start.
        assert after < 0.1 * before, (T, E, K, before, after)


def test_exact_cutoffs_balance_faster_than_upstreams():
    """Measuring unselected experts against the K-th score, not the (K+1)-th."""
    gen = torch.Generator().manual_seed(3)
    for T, E, K in ((3000, 8, 1), (5000, 64, 6)):
        scores_TE = torch.sigmoid(torch.randn(T, E, generator=gen) + torch.randn(E, generator=gen) * 0.5)
        after = {}
        for upstream in (False, True):
            bias_E = torch.zeros(E)
            for _ in range(2):
                _, selected = _route(scores_TE, bias_E, K)
                hist = _histogram(scores_TE, bias_E, K, upstream_cutoff=upstream)
                bias_E = compute_bias_update(selected.sum(0).double(), bias_E, rate=1.0,
                                             rule="quantile", center=True, histogram=hist)
            _, selected = _route(scores_TE, bias_E, K)
            after[upstream] = float(max_violation(selected.sum(0).double()))
        assert after[False] < 0.5 * after[True], (T, E, K, after)


def test_margin_bins_are_the_edges_buckets():
    gen = torch.Generator().manual_seed(8)
    values = torch.randn(100_000, generator=gen) * 10 ** torch.empty(100_000).uniform_(-7, 1, generator=gen)
    edges = torch.tensor(MARGIN_EDGES)
    values = torch.cat([values, edges, -edges, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e3, -1e3])])
    assert torch.equal(margin_bins(values).long(), torch.bucketize(values, edges, right=True))


def test_histogram_mass_below_zero_is_the_count_and_padding_adds_nothing():
    gen = torch.Generator().manual_seed(2)
    scores_TE = torch.rand(300, 16, generator=gen)
    bias_E = torch.randn(16, generator=gen) * 0.1
    keep_T = torch.rand(300, generator=gen) > 0.3
    hist = _histogram(scores_TE, bias_E, 4, weight_T=keep_T.float())
    _, selected = _route(scores_TE, bias_E, 4)
    assert hist.shape == (16, 2, MARGIN_BINS)
    assert torch.equal(hist[:, 0, : MARGIN_BINS // 2].sum(-1), selected[keep_T].sum(0).float())
    assert torch.equal(hist[:, 0].sum(-1), torch.full((16,), float(keep_T.sum())))
    # Histograms add: the quantile of two halves' sum is the quantile of the whole.
    halves = _histogram(scores_TE[:150], bias_E, 4) + _histogram(scores_TE[150:], bias_E, 4)
    whole = _histogram(scores_TE, bias_E, 4)
    assert torch.equal(halves[:, 0], whole[:, 0])
    assert torch.allclose(quantile_step(halves), quantile_step(whole), atol=1e-6)


def test_layer_without_tokens_and_rate_zero_keep_the_bias():
    hist = torch.zeros(2, 8, 2, MARGIN_BINS)
    bias = torch.randn(2, 8)
    hist[1] = _histogram(torch.rand(64, 8), bias[1], 2)
    counts = torch.stack([torch.zeros(8), hist[1, :, 0, : MARGIN_BINS // 2].sum(-1)])
    new = compute_bias_update(counts, bias, rate=1.0, rule="quantile", center=True, histogram=hist)
    assert torch.equal(new[0], bias[0])
    assert not torch.equal(new[1], bias[1])
    assert compute_bias_update(counts, bias, rate=0.0, rule="quantile", center=True, histogram=hist) is bias


def test_quantile_rule_needs_a_histogram_and_a_fraction():
    with pytest.raises(ValueError, match="histogram: the quantile rule needs"):
        compute_bias_update(torch.ones(8), torch.zeros(8), rate=0.5, rule="quantile")
    with pytest.raises(ValueError, match="lossfree.update_rate: must be in \\[0, 1\\] with update_rule quantile"):
        LossFreeConfig(update_rule="quantile", update_rate=2.0)


def _router(pg_collection, experts=16, **overrides):
    config = moe_transformer_config(num_layers=1, hidden_size=32, num_attention_heads=4,
                                    num_experts=experts, topk=4, **overrides)
    return LossFreeRouter(config, pg_collection=pg_collection)


@pytest.mark.parametrize("score_function", ["sigmoid", "softmax", "sqrtsoftplus"])
@pytest.mark.parametrize("groups", [None, (4, 2)])
def test_router_histogram_matches_its_counts(pg_collection, score_function, groups):
    if score_function == "sqrtsoftplus" and (why := missing_upstream_feature("sqrtsoftplus")):
        pytest.skip(why)  # LossFreeRouter refuses it there (tests/test_megatron_compat.py)
    overrides = dict(moe_router_score_function=score_function)
    if groups:
        overrides.update(moe_router_num_groups=groups[0], moe_router_group_topk=groups[1])
    router = _router(pg_collection, **overrides)
    router.record_margins = True
    router.expert_bias.copy_(torch.randn(16, generator=torch.Generator().manual_seed(3)) * 0.05)
    x = torch.randn(32, 4, 32, generator=torch.Generator().manual_seed(4))
    padding = torch.zeros(32, 4, dtype=torch.bool)
    padding[-5:] = True
    probs, routing_map = router(x, padding_mask=padding)
    assert router.local_margin_histogram.sum() == 0  # committed by backward, like the counts
    probs.sum().backward()
    hist = router.local_margin_histogram
    assert torch.equal(hist[:, 0, : MARGIN_BINS // 2].sum(-1), router.local_tokens_per_expert)
    assert hist[:, 0].sum() == 16 * (128 - 20)


def test_group_limited_routing_balances_under_the_quantile_rule(pg_collection):
    """The same batch again and again: group-limited top-K reaches balance."""
    router = _router(pg_collection, moe_router_num_groups=4, moe_router_group_topk=2)
    with torch.no_grad():
        router.weight.add_(torch.randn(16, 32, generator=torch.Generator().manual_seed(5)) * 0.3)
    balancer = LossFreeBalancer(torch.nn.ModuleList([router]),
                                LossFreeConfig(update_rule="quantile", update_rate=0.5))
    # A shared component in every token's hidden state makes some experts popular.
    x = torch.randn(256, 4, 32, generator=torch.Generator().manual_seed(6)) + 1.0
    maxvio = []
    for _ in range(12):
        probs, _ = router(x)
        probs.sum().backward()
        maxvio.append(balancer.step()["lossfree/maxvio_batch"])
    assert maxvio[0] > 0.5
    assert min(maxvio[-3:]) < 0.15, maxvio


def test_mixed_expert_counts_under_the_quantile_rule(pg_collection):
    routers = torch.nn.ModuleList([_router(pg_collection, experts=8), _router(pg_collection, experts=16)])
    for number, router in enumerate(routers, start=1):
        router.set_layer_number(number)
    balancer = LossFreeBalancer(routers, LossFreeConfig(update_rule="quantile", update_rate=1.0))
    x = torch.randn(64, 4, 32, generator=torch.Generator().manual_seed(7))
    for router in routers:
        probs, _ = router(x)
        probs.sum().backward()
    expected = [
        compute_bias_update(r.local_tokens_per_expert.double(), r.expert_bias.clone(), rate=1.0,
                            rule="quantile", center=True, histogram=r.local_margin_histogram.clone())
        for r in routers
    ]
    balancer.step()
    for router, bias in zip(routers, expected):
        assert torch.equal(router.expert_bias, bias)
        assert router.local_margin_histogram.sum() == 0


def _kalman_gain(noise_var: float, drift_var: float) -> float:
    """Steady-state Kalman gain of a random walk (variance drift_var) seen in white noise (Muth 1960)."""
    r = drift_var / noise_var
    p = (r + (r * r + 4 * r) ** 0.5) / 2
    return p / (p + 1)


@pytest.mark.parametrize("drift, noise", [(1e-6, 1e-4), (1e-4, 1e-6), (1e-5, 1e-5), (1e-6, 1e-5)])
def test_adaptive_gain_finds_the_best_filter_of_a_drifting_noisy_target(drift, noise):
    """The balancing biases as a random walk seen through noise: the gain settles at Kalman's."""
    from nemo_lossfree.update import adaptive_quantile_update, adaptive_state

    gen = torch.Generator().manual_seed(0)
    level, bias = torch.zeros(1, 64, dtype=torch.float64), torch.zeros(1, 64, dtype=torch.float64)
    state = adaptive_state(1, 64, ceiling=1.0)
    gains = []
    for _ in range(600):
        level = level + torch.randn(1, 64, generator=gen, dtype=torch.float64) * drift**0.5
        observed = level + torch.randn(1, 64, generator=gen, dtype=torch.float64) * noise**0.5
        bias, state, gain = adaptive_quantile_update(torch.ones(1, 64), bias, observed - bias, state,
                                                     ceiling=1.0, floor=0.0, center=False)
        gains.append(float(gain))
    ideal = _kalman_gain(noise, drift)
    settled = sum(gains[-300:]) / 300
    assert abs(settled - ideal) < 0.05 + 0.25 * ideal, (settled, ideal)
    assert gains[0] == 1.0  # the ceiling until there are two moves to compare
    # A layer without tokens keeps its bias and its state.
    kept, kept_state, _ = adaptive_quantile_update(torch.zeros(1, 64), bias, torch.ones(1, 64), state,
                                                   ceiling=1.0, floor=0.0, center=False)
    assert torch.equal(kept, bias)
    assert all(torch.equal(kept_state[key], state[key]) for key in state)


def test_adaptive_gain_moves_by_the_sign_of_successive_moves():
    from nemo_lossfree.update import ADAPTIVE_GAIN_STEP, adaptive_quantile_update, adaptive_state

    move = torch.tensor([[1.0, -1.0, 0.5, -0.5]])
    state = adaptive_state(1, 4, ceiling=0.5)
    bias = torch.zeros(1, 4)
    counts = torch.ones(1, 4)
    # First step: nothing to compare with, the gain stays at the ceiling.
    bias, state, gain = adaptive_quantile_update(counts, bias, move, state, ceiling=0.5, floor=0.1,
                                                 center=True)
    assert float(gain) == 0.5
    # The same direction again (trailing a drift): up, but never above the ceiling.
    _, _, gain = adaptive_quantile_update(counts, bias, move, state, ceiling=0.5, floor=0.1, center=True)
    assert float(gain) == 0.5
    _, _, gain = adaptive_quantile_update(counts, bias, move, state, ceiling=0.9, floor=0.1, center=True)
    assert float(gain) == pytest.approx(0.5 * math.exp(ADAPTIVE_GAIN_STEP))
    # Reversed (following noise): down by the same factor, then held at the floor.
    bias, state, gain = adaptive_quantile_update(counts, bias, -move, state, ceiling=0.5, floor=0.1,
                                                 center=True)
    assert float(gain) == pytest.approx(0.5 * math.exp(-ADAPTIVE_GAIN_STEP))
    for _ in range(20):
        move = -move
        bias, state, gain = adaptive_quantile_update(counts, bias, move, state, ceiling=0.5, floor=0.1,
                                                     center=True)
    assert float(gain) == 0.1


def test_adaptive_schedule_state_round_trips_and_is_refused_without_the_quantile_rule(pg_collection):
    with pytest.raises(ValueError, match="lossfree.schedule: adaptive needs update_rule quantile"):
        LossFreeConfig(update_rule="sign", schedule="adaptive")
    with pytest.raises(ValueError, match="lossfree.integral_gain: must be 0 with schedule adaptive"):
        LossFreeConfig(schedule="adaptive", integral_gain=0.1)
    config = LossFreeConfig(schedule="adaptive", update_rate=1.0, min_update_rate=0.05)
    x = torch.randn(64, 4, 32, generator=torch.Generator().manual_seed(9)) + 1.0

    def run(balancer, routers, steps):
        gains = []
        for _ in range(steps):
            for router in routers:
                probs, _ = router(x)
                probs.sum().backward()
            gains.append(balancer.step()["lossfree/update_rate"])
        return gains

    routers = torch.nn.ModuleList([_router(pg_collection, experts=8), _router(pg_collection, experts=16)])
    balancer = LossFreeBalancer(routers, config)
    gains = run(balancer, routers, 5)
    assert gains[0] == 1.0 and all(0.05 <= g <= 1.0 for g in gains) and len(set(gains)) > 1
    saved = balancer.state_dict()
    biases = [r.expert_bias.clone() for r in routers]
    after = run(balancer, routers, 3)
    resumed = LossFreeBalancer(routers, config)
    for router, bias in zip(routers, biases):
        router.expert_bias.copy_(bias)
    resumed.load_state_dict(saved)
    assert run(resumed, routers, 3) == after
