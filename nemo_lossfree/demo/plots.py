"""The demo's figure: MaxVio_batch and training loss per step, every arm."""

from __future__ import annotations

import json
from pathlib import Path


def plot_arms(out: Path, arms: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax_vio, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm in arms:
        history = json.loads((out / f"{arm}.json").read_text())["history"]
        steps = range(1, len(history["loss"]) + 1)
        ax_vio.plot(steps, history["maxvio_batch"], label=arm, linewidth=1.2)
        ax_loss.plot(steps, history["loss"], label=arm, linewidth=1.2)
    ax_vio.set_yscale("log")
    ax_vio.axhline(0.2, color="grey", linestyle=":", linewidth=1)
    ax_vio.set_xlabel("step")
    ax_vio.set_ylabel("MaxVio_batch (mean over MoE layers)")
    ax_vio.set_title("load balance per training step")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (nats/byte)")
    ax_loss.set_title("language-modelling loss")
    for ax in (ax_vio, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
