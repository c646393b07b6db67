"""The Pareto comparison of the demo on hand-made results (no training)."""

import math

import pytest

from nemo_lossfree.apps.demo.pareto import aux_frontier, describe, frontier_loss_at, matched_balance
from nemo_lossfree.apps.demo.results import combine_seeds


def _arms(loss_free=(0.2, 2.0)):
    return {
        "loss_free": {"maxvio_global": loss_free[0], "val_loss": loss_free[1]},
        "aux_loss_1e-3": {"maxvio_global": 1.6, "val_loss": 2.00},
        "aux_loss": {"maxvio_global": 0.4, "val_loss": 2.10},
        "aux_loss_1e-1": {"maxvio_global": 0.1, "val_loss": 2.30},
        "megatron_bias": {"maxvio_global": 0.05, "val_loss": 9.0},  # not on the frontier
    }


def test_frontier_is_the_aux_arms_most_balanced_first():
    frontier = aux_frontier(_arms())
    assert [p["arm"] for p in frontier] == ["aux_loss_1e-1", "aux_loss", "aux_loss_1e-3"]


def test_interpolation_is_linear_in_log_maxvio():
    frontier = aux_frontier(_arms())
    # 0.2 is halfway between 0.1 and 0.4 in log space: halfway between 2.30 and 2.10.
    assert frontier_loss_at(frontier, 0.2) == pytest.approx(2.20)
    assert frontier_loss_at(frontier, 0.4) == pytest.approx(2.10)
    assert frontier_loss_at(frontier, 0.8) == pytest.approx(2.05)
    assert frontier_loss_at(frontier, 0.05) is None and frontier_loss_at(frontier, 2.0) is None


def test_matched_balance_and_its_line():
    result = matched_balance(_arms())["loss_free"]
    assert result["frontier_val_loss_at_matched_balance"] == pytest.approx(2.20)
    assert result["val_loss_vs_frontier_pct"] == pytest.approx(100 * (2.0 / 2.2 - 1))
    assert "(-9.09%)" in describe(matched_balance(_arms()))
    # 0.2 / 2.0 is at least as good on both axes as 0.4 / 2.10 and 1.6 / 2.00, not as 0.1 / 2.30.
    assert result["dominates"] == ["aux_loss", "aux_loss_1e-3"]
    assert describe(matched_balance(_arms())).endswith("better on both axes than aux_loss, aux_loss_1e-3")
    outside = matched_balance(_arms(loss_free=(0.05, 2.0)))
    assert outside["loss_free"]["where"] == "more balanced than every aux-loss arm"
    assert "no frontier loss" in describe(outside)


def test_seeds_combine_into_means_and_spreads():
    def run(maxvio, loss):
        arms = {name: dict(r, val_ppl=math.exp(r["val_loss"]), maxvio_batch_last=0.3, wall_s=1.0,
                           description=name, **{"steps_to_maxvio_batch_below_0.2": None})
                for name, r in _arms((maxvio, loss)).items()}
        return {"arms": arms, "config": {"seed": 0, "steps": 3}, "pareto": matched_balance(arms)}

    combined = combine_seeds({1: run(0.1, 2.0), 2: run(0.4, 2.2)})
    lf = combined["arms"]["loss_free"]
    assert lf["maxvio_global"] == pytest.approx(0.25) and lf["maxvio_global_std"] == pytest.approx(0.15)
    assert lf["val_loss"] == pytest.approx(2.1) and lf["val_loss_std"] == pytest.approx(0.1)
    assert set(lf["per_seed"]) == {"1", "2"}
    assert combined["config"]["seeds"] == [1, 2] and "seed" not in combined["config"]
    assert combined["pareto"]["per_seed"]["1"]["val_loss"] == 2.0
