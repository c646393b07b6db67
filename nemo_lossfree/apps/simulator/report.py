"""The simulator's outputs: a JSON document and a PNG plot."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from nemo_lossfree.apps.simulator.dynamics import Trace


def write_json(path: str, document: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(document, handle, indent=2)


def write_plot(path: str, strategies: Sequence[Trace], scan: Sequence[Trace],
               recommended_rate: float, target: float, title: str) -> None:
    """MaxVio_batch over steps per strategy; regret and steady MaxVio over the rate grid."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for trace in strategies:
        left.plot(trace.maxvio, label=trace.name, linewidth=1)
    left.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:g}")
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("MaxVio_batch")
    left.set_title("strategies at the base rate")
    left.legend(fontsize=8)
    if scan:
        rates = [t.config.update_rate for t in scan]
        right.plot(rates, [t.regret() for t in scan], marker="o", label="cumulative regret")
        right.axvline(recommended_rate, color="red", linestyle="--", linewidth=1,
                      label=f"recommended {recommended_rate:g}")
        right.set_xscale("log")
        right.set_yscale("log")
        right.set_xlabel("update rate")
        right.set_ylabel("sum of MaxVio_batch")
        twin = right.twinx()
        twin.plot(rates, [t.steady_maxvio() for t in scan], marker="s", color="green",
                  linewidth=1, label="steady MaxVio (last 20%)")
        twin.set_ylabel("steady MaxVio", color="green")
        right.legend(fontsize=8, loc="upper center")
        right.set_title("rate scan")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
