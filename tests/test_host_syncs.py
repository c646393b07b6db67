"""No host synchronisation in a balancer step that records no metrics (counted on the CPU).

``HostSyncCounter`` records the calls that would make a GPU's host wait for the
device (read-backs, data-dependent output sizes, host data copied to the
device). On a GPU, benchmarks/README.md shows the same check with
``torch.cuda.set_sync_debug_mode``.
"""

import pytest
import torch

from nemo_lossfree import LossFreeBalancer, LossFreeConfig
from nemo_lossfree.testing.host_syncs import HostSyncCounter

from _support.routers import quantile_batch, routers_with_expert_counts


def test_the_counter_sees_each_kind_of_synchronisation():
    x = torch.arange(6.0)
    cases = [
        lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x.sum() > 0), lambda: float(x[0]),
        lambda: torch.isfinite(x).all() and None, lambda: torch.nonzero(x), lambda: x[x > 2],
        lambda: torch.tensor([1.0], device=x.device), lambda: x.cpu(), lambda: torch.equal(x, x),
        lambda: torch.where(x > 1), lambda: x.unique(),
    ]
    for case in cases:
        with HostSyncCounter() as counter:
            case()
        assert counter.total == 1, counter.calls
    with HostSyncCounter() as counter:  # device-only work: none
        torch.where(torch.isfinite(x), x, torch.zeros_like(x)).sum()
        torch.full((2,), 1.0, device=x.device)
        x[torch.tensor([0, 1])]
    assert counter.total == 0, counter.calls


CONFIGS = {
    "sign": dict(update_rule="sign", update_rate=0.1),
    "quantile": dict(),
    "integral_inverse_time": dict(update_rule="proportional", integral_gain=0.5, schedule="inverse_time"),
    "adaptive": dict(schedule="adaptive"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_no_host_sync_on_steps_that_record_no_metrics(pg_collection, name):
    # Before: `if not torch.isfinite(flat).all()` every step, and
    # compute_bias_update's own isfinite check (two per step).
    config = LossFreeConfig(log_every=4, **CONFIGS[name])
    model = routers_with_expert_counts(pg_collection, [8, 16, 8])  # mixed expert counts: two groups
    model[2].frozen_expert_bias = True
    balancer = LossFreeBalancer(model, config)
    syncs, calls = [], []
    for step in range(8):
        for index, router in enumerate(model):
            quantile_batch(router, seed=10 * step + index)
        if step == 5:  # a non-finite count is handled on the device too
            model[0].local_tokens_per_expert[2] = float("nan")
        with HostSyncCounter() as counter:
            balancer.step()  # step 5's NaN is reported on step 8, after the loop
        syncs.append(counter.total)
        calls.append(counter.summary())
    assert [s for step, s in enumerate(syncs) if step % 4] == [0] * 6
    # A logging step reads its metrics back in two transfers: the load and health
    # table, then the bias statistics with the rate and the non-finite count (the
    # first step also builds the quantile rule's bin edges on the device, once).
    assert calls[4] == {"tolist": 2}, calls[4]
    assert syncs[0] <= 3, calls[0]
    assert model[1].expert_bias.abs().sum() > 0


def test_a_load_costs_one_read_of_the_step_counter(pg_collection):
    model = routers_with_expert_counts(pg_collection, [8])
    balancer = LossFreeBalancer(model, LossFreeConfig(update_rule="sign", log_every=10))
    balancer.step()  # step 0 records metrics
    model.load_state_dict(model.state_dict())
    with HostSyncCounter() as counter:
        balancer.step()
    assert counter.calls == ["tolist"]  # the step counter, read once after the load
    with HostSyncCounter() as counter:
        balancer.step()
    assert counter.total == 0
