"""One figure per run: the layers x experts load heatmap over training, and the balance curves.

Top row: the relative load of every (layer, expert) at up to ``SNAPSHOTS``
steps spread over the run (log2 colour scale, white = the layer's mean).
Bottom row: MaxVio_batch (mean over layers, worst layer, each layer thin),
the spread of the relative load (min, p5, median, p95, max over all layers),
and the EP-rank overload (mean and worst layer) where the run had EP > 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nemo_lossfree.apps.report.events import RunLog

SNAPSHOTS = 5
LOG2_RANGE = 2.0  # colour scale: relative loads 1/4 .. 4


def snapshot_steps(run: RunLog, count: int = SNAPSHOTS) -> list[int]:
    """Indices into ``run.loads`` spread evenly from the first to the last matrix."""
    n = len(run.loads)
    if n <= count:
        return list(range(n))
    return sorted({round(i * (n - 1) / (count - 1)) for i in range(count)})


def plot_run(run: RunLog, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    picks = snapshot_steps(run)
    columns = max(len(picks), 3)
    fig = plt.figure(figsize=(4.2 * columns, 8.2), layout="constrained")
    grid = fig.add_gridspec(2, columns, height_ratios=[1.1, 1.0])
    cmap = plt.get_cmap("RdBu_r").copy()
    cmap.set_bad("0.75")
    image = None
    if picks:
        for column, index in enumerate(picks):
            step, matrix = run.loads[index]
            ax = fig.add_subplot(grid[0, column])
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.log2(np.maximum(matrix[:, 1:].astype(np.float32), 2.0 ** -LOG2_RANGE))
            image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap, vmin=-LOG2_RANGE,
                              vmax=LOG2_RANGE, interpolation="nearest")
            layers = matrix[:, 0].astype(int).tolist()
            ax.set_yticks(range(len(layers)), [str(layer) for layer in layers] if len(layers) <= 16 else None)
            if len(layers) > 16:
                ax.set_yticks([])
            ax.set_title(f"step {step}", fontsize=10)
            ax.set_xlabel("expert")
            if column == 0:
                ax.set_ylabel("MoE layer")
        bar = fig.colorbar(image, ax=[fig.axes[i] for i in range(len(picks))], fraction=0.02, pad=0.01)
        ticks = np.arange(-LOG2_RANGE, LOG2_RANGE + 1)
        bar.set_ticks(ticks, labels=[f"{2.0 ** t:g}" for t in ticks])
        bar.set_label("tokens / layer mean")
    else:
        ax = fig.add_subplot(grid[0, :])
        ax.axis("off")
        ax.text(0.5, 0.5, "no lossfree/loads in these event files (written every heatmap_every steps)",
                ha="center", va="center")

    ax_vio = fig.add_subplot(grid[1, 0])
    for layer in run.layers("maxvio_batch"):
        ax_vio.plot(*run.series("maxvio_batch", layer), linewidth=0.6, alpha=0.35, color="C0")
    ax_vio.plot(*run.series("maxvio_batch"), color="C0", linewidth=1.4, label="mean over layers")
    ax_vio.plot(*run.series("maxvio_batch_max"), color="C3", linewidth=1.0, label="worst layer")
    ax_vio.set_title("MaxVio_batch (thin: each layer)")
    _finish(ax_vio, log=True)

    ax_spread = fig.add_subplot(grid[1, 1])
    steps, p50 = run.series("load_median")
    if steps:
        for low, high, alpha in (("load_min", "load_max", 0.15), ("load_p5", "load_p95", 0.3)):
            s_low, v_low = run.series(low)
            s_high, v_high = run.series(high)
            if s_low == s_high == steps:
                ax_spread.fill_between(steps, v_low, v_high, color="C2", alpha=alpha, linewidth=0,
                                       label=f"{low[5:]} .. {high[5:]}")
        ax_spread.plot(steps, p50, color="C2", linewidth=1.2, label="median")
    ax_spread.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax_spread.set_title("relative load over all layers' experts")
    _finish(ax_spread, log=False)

    ax_ep = fig.add_subplot(grid[1, 2])
    if run.series("ep_overload")[0]:
        for layer in run.layers("ep_overload"):
            ax_ep.plot(*run.series("ep_overload", layer), linewidth=0.6, alpha=0.35, color="C1")
        ax_ep.plot(*run.series("ep_overload"), color="C1", linewidth=1.4, label="mean over layers")
        ax_ep.plot(*run.series("ep_overload_max"), color="C3", linewidth=1.0, label="worst layer")
        ax_ep.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    else:
        ax_ep.text(0.5, 0.5, "no lossfree/ep_overload (expert parallel 1)", ha="center", va="center",
                   transform=ax_ep.transAxes)
    ax_ep.set_title("EP overload: busiest EP rank / mean")
    _finish(ax_ep, log=False)

    fig.suptitle(f"{run.name}: load balance over training", fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _finish(ax, *, log: bool) -> None:
    ax.set_xlabel("step")
    if log and any(line.get_ydata().size and (np.asarray(line.get_ydata()) > 0).all() for line in ax.lines):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
