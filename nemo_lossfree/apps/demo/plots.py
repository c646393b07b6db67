"""The demo's figure: balance and loss per step, and the Pareto picture.

Left: MaxVio_batch per step; middle: training loss per step (the first seed's
runs); right: validation loss against MaxVio_global, one point per arm (the
mean over seeds, with their standard deviation as error bars), the aux-loss
arms joined into their frontier.
"""

from __future__ import annotations

import json
from pathlib import Path


def _decimal_log_labels(axis) -> None:
    """Plain decimals on a log axis, minor ticks labelled at 2 and 5 only: the
    default 3x10^-1, 4x10^-1, ... labels run into each other within a decade."""
    import matplotlib.ticker

    axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:.2g}" if f"{x:.1e}"[0] in "25" else ""))


def plot_demo(results: dict, seed_dirs: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax_vio, ax_loss, ax_pareto) = plt.subplots(1, 3, figsize=(17, 4.8))
    arms = list(results["arms"])
    first_dir = next(iter(seed_dirs.values()))
    colors = {arm: f"C{i}" for i, arm in enumerate(arms)}
    for arm in arms:
        history = json.loads((Path(first_dir) / f"{arm}.json").read_text())["history"]
        steps = range(1, len(history["loss"]) + 1)
        ax_vio.plot(steps, history["maxvio_batch"], label=arm, linewidth=1.1, color=colors[arm])
        ax_loss.plot(steps, history["loss"], label=arm, linewidth=1.1, color=colors[arm])
    ax_vio.set_yscale("log")
    _decimal_log_labels(ax_vio.yaxis)
    ax_vio.axhline(0.2, color="grey", linestyle=":", linewidth=1)
    ax_vio.set_xlabel("step")
    ax_vio.set_ylabel("MaxVio_batch (mean over MoE layers)")
    ax_vio.set_title("load balance per training step")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (nats/token)")
    ax_loss.set_title("language-modelling loss")

    frontier = results.get("pareto", {}).get("frontier", [])
    if len(frontier) > 1:
        ax_pareto.plot([p["maxvio_global"] for p in frontier], [p["val_loss"] for p in frontier],
                       color="grey", linestyle="--", linewidth=1, label="aux-loss frontier")
    for arm, r in results["arms"].items():
        ax_pareto.errorbar(r["maxvio_global"], r["val_loss"], xerr=r.get("maxvio_global_std"),
                           yerr=r.get("val_loss_std"), fmt="o", capsize=3, color=colors[arm], label=arm)
    ax_pareto.set_xscale("log")
    _decimal_log_labels(ax_pareto.xaxis)
    ax_pareto.set_xlabel("MaxVio_global (validation set; lower is more balanced)")
    ax_pareto.set_ylabel("validation loss")
    seeds = results["config"].get("seeds")
    ax_pareto.set_title("balance vs loss" + (f" (mean ± std over {len(seeds)} seeds)" if seeds else ""))
    for ax in (ax_vio, ax_loss, ax_pareto):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
