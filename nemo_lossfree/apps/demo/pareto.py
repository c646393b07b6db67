"""The paper's claim as a Pareto comparison: balance against loss, per arm.

An auxiliary loss trades language-modelling loss against balance; its
coefficients trace a frontier of (MaxVio_global, validation loss) points. A
balancer beats it when it sits below that frontier: at its own balance, the
frontier's loss (interpolated between the two aux-loss arms around it,
linearly in log MaxVio_global) is higher than its own. Outside the frontier's
range there is nothing to interpolate, and the result says so.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from nemo_lossfree.apps.demo.arms import ARMS


def aux_frontier(arms: dict[str, dict]) -> list[dict[str, float]]:
    """The aux-loss arms' points, most balanced first."""
    points = [
        {"arm": name, "aux_coeff": ARMS[name].aux_coeff, "maxvio_global": r["maxvio_global"],
         "val_loss": r["val_loss"]}
        for name, r in arms.items() if name in ARMS and ARMS[name].aux_coeff is not None
    ]
    return sorted(points, key=lambda p: p["maxvio_global"])


def frontier_loss_at(frontier: list[dict[str, float]], maxvio: float) -> Optional[float]:
    """The frontier's validation loss at ``maxvio`` (None outside its range or with < 2 points)."""
    for low, high in zip(frontier, frontier[1:]):
        a, b = math.log(low["maxvio_global"]), math.log(high["maxvio_global"])
        x = math.log(maxvio) if maxvio > 0 else -math.inf
        if a <= x <= b:
            weight = 0.0 if b == a else (x - a) / (b - a)
            return low["val_loss"] + weight * (high["val_loss"] - low["val_loss"])
    return None


def matched_balance(arms: dict[str, dict], arm: str = "loss_free") -> dict[str, Any]:
    """``arm`` against the aux-loss frontier at ``arm``'s own MaxVio_global."""
    frontier = aux_frontier(arms)
    result: dict[str, Any] = {"frontier": frontier}
    if arm not in arms or len(frontier) < 2:
        return result
    own = arms[arm]
    at = frontier_loss_at(frontier, own["maxvio_global"])
    result[arm] = {
        # The aux-loss arms this arm beats on both axes (at least as balanced, no higher loss).
        "dominates": [p["arm"] for p in frontier
                      if own["maxvio_global"] <= p["maxvio_global"] and own["val_loss"] <= p["val_loss"]],
        "maxvio_global": own["maxvio_global"],
        "val_loss": own["val_loss"],
        "frontier_val_loss_at_matched_balance": at,
        "val_loss_vs_frontier_pct": None if at is None else 100.0 * (own["val_loss"] / at - 1.0),
        "where": (
            "inside the frontier's range" if at is not None
            else "more balanced than every aux-loss arm" if own["maxvio_global"] < frontier[0]["maxvio_global"]
            else "less balanced than every aux-loss arm"
        ),
    }
    return result


def describe(pareto: dict[str, Any], arm: str = "loss_free") -> str:
    """One line for the console and the report."""
    mine = pareto.get(arm)
    if mine is None:
        return "loss at matched balance: needs the loss_free arm and two aux-loss arms"
    beaten = mine.get("dominates") or []
    tail = f"; better on both axes than {', '.join(beaten)}" if beaten else ""
    if mine["frontier_val_loss_at_matched_balance"] is None:
        return (f"loss at matched balance: {arm} (MaxVio_global {mine['maxvio_global']:.3f}) is "
                f"{mine['where']}; no frontier loss to compare{tail}")
    return (f"loss at matched balance: {arm} {mine['val_loss']:.4f} vs aux-loss frontier "
            f"{mine['frontier_val_loss_at_matched_balance']:.4f} at MaxVio_global "
            f"{mine['maxvio_global']:.3f} ({mine['val_loss_vs_frontier_pct']:+.2f}%){tail}")
