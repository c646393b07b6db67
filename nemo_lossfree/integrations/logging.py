"""The one writer of ``lossfree/...`` metrics into a framework's TensorBoard and W&B writers.

Megatron-LM (``get_tensorboard_writer()`` / ``get_wandb_writer()``), Megatron-Bridge
(``state.tensorboard_logger`` / ``state.wandb_logger``) and the demo (its own
``SummaryWriter``) hand their writers to ``MetricsWriter.write``; nothing here
opens a writer of its own.

- Scalars (``metrics.METRICS``): ``add_scalar`` per name; one ``wandb.log``
  call with all of them.
- The layers x experts load matrix, at most every ``heatmap_every`` steps:
  a TensorBoard tensor ``lossfree/loads`` (float16, column 0 the layer
  number; what ``nemo-lossfree report`` draws the heatmap from) and an image
  ``lossfree/load_heatmap`` (TensorBoard image, ``wandb.Image``). About
  ``2 x layers x (experts + 1)`` bytes of tensor plus a small PNG per write:
  30 KB + ~5 KB for 59 layers of 256 experts.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import numpy as np
import torch

from nemo_lossfree import metrics as lf_metrics

#: Steps between two load-matrix writes by default (a 100k-step run: 1000 snapshots).
DEFAULT_HEATMAP_EVERY = 100
#: TensorBoard plugin name of the load-matrix tensor (TensorBoard shows no dashboard for it).
LOADS_PLUGIN = "nemo_lossfree_loads"
# Image: log2 of the relative load, clipped here, and pixels per matrix cell.
_LOG2_RANGE = 2.0
_CELL_PIXELS = 4


def heatmap_rgb(loads_LX: np.ndarray, cell: int = _CELL_PIXELS) -> np.ndarray:
    """``uint8 [L * cell, E * cell, 3]``: the relative loads of ``load_matrix`` (column 0 dropped).

    Diverging around the mean: white at 1, blue under (0.25 and below fully),
    red over (4 and above fully), grey where a layer has no such expert.
    No matplotlib: this runs inside training.
    """
    rel = loads_LX[:, 1:].astype(np.float32)
    missing = ~np.isfinite(rel)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.clip(np.log2(np.where(missing, 1.0, np.maximum(rel, 1e-6))) / _LOG2_RANGE, -1.0, 1.0)
    over, under = np.clip(x, 0, 1), np.clip(-x, 0, 1)
    red = 1.0 - under * 0.85
    green = 1.0 - (over + under) * 0.85
    blue = 1.0 - over * 0.85
    rgb = np.stack([red, green, blue], axis=-1)
    rgb[missing] = 0.6
    image = (rgb * 255).round().astype(np.uint8)
    return image.repeat(cell, axis=0).repeat(cell, axis=1)


def _loads_summary(loads_LX: np.ndarray):
    """A TensorBoard ``Summary`` holding the load matrix as a tensor."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.util import tensor_util

    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(
            plugin_name=LOADS_PLUGIN, content=json.dumps({"columns": "layer, relative load per expert"}).encode()
        ),
        summary_description=lf_metrics.metric("loads").meaning,
    )
    value = Summary.Value(tag=lf_metrics.tag("loads"), tensor=tensor_util.make_tensor_proto(loads_LX),
                          metadata=metadata)
    return Summary(value=[value])


class MetricsWriter:
    """Writes the balancer's metrics (and now and then its load matrix) through given writers.

    Args:
        heatmap_every: steps between load-matrix writes (0: never).
    """

    def __init__(self, heatmap_every: int = DEFAULT_HEATMAP_EVERY) -> None:
        if isinstance(heatmap_every, bool) or not isinstance(heatmap_every, int) or heatmap_every < 0:
            raise ValueError(f"heatmap_every: must be an integer >= 0, got {heatmap_every!r}")
        self.heatmap_every = heatmap_every
        self._last_heatmap_step: Optional[int] = None

    def heatmap_due(self, step: int) -> bool:
        if not self.heatmap_every:
            return False
        last = self._last_heatmap_step
        return last is None or step < last or step - last >= self.heatmap_every

    def write(self, step: int, metrics: dict[str, float],
              loads: Optional[tuple[Sequence[int], Sequence[torch.Tensor]]] = None, *,
              tensorboard: Any = None, wandb: Any = None) -> None:
        """Scalars every call; ``loads`` (``LossFreeBalancer.last_loads``) when a heatmap is due."""
        if tensorboard is not None:
            for name, value in metrics.items():
                tensorboard.add_scalar(name, value, step)
        payload: dict[str, Any] = dict(metrics)
        if loads is not None and loads[1] and self.heatmap_due(step):
            self._last_heatmap_step = step
            matrix = lf_metrics.load_matrix(*loads)
            image = heatmap_rgb(matrix)
            if tensorboard is not None:
                # torch's SummaryWriter has no public call for a raw tensor summary.
                tensorboard._get_file_writer().add_summary(_loads_summary(matrix), step)
                tensorboard.add_image(lf_metrics.tag("load_heatmap"), image, step, dataformats="HWC")
            image_type = _wandb_image_type(wandb)
            if image_type is not None:
                payload[lf_metrics.tag("load_heatmap")] = image_type(image, caption="layers x experts")
        if wandb is not None and payload:
            wandb.log(payload, step)


def _wandb_image_type(wandb: Any):
    """``wandb.Image`` for Megatron's and Bridge's W&B writer (the ``wandb`` module), else None."""
    if wandb is None:
        return None
    image_type = getattr(wandb, "Image", None)
    if image_type is None:
        try:
            import wandb as wandb_module
        except ImportError:
            return None
        image_type = wandb_module.Image
    return image_type
