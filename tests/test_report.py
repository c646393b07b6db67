"""The one metrics writer (integrations/logging.py) and ``nemo-lossfree report``'s pictures.

Known counts go through ``MetricsWriter`` into real TensorBoard event files;
the load matrices read back must be the hand-computed relative loads, and the
report must draw a figure with the heatmap's colours in it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nemo_lossfree import metrics as lf_metrics
from nemo_lossfree.apps.cli import main
from nemo_lossfree.apps.report.events import read_run
from nemo_lossfree.integrations.logging import MetricsWriter, heatmap_rgb

# Layer 3 has 4 experts, layer 5 has 2 (mixed expert counts): mean 2 and 2.
COUNTS = [torch.tensor([2.0, 0.0, 4.0, 2.0]), torch.tensor([3.0, 1.0])]
RELATIVE = [[1.0, 0.0, 2.0, 1.0], [1.5, 0.5, math.nan, math.nan]]


def _write_run(directory, steps=7, heatmap_every=3):
    from torch.utils.tensorboard import SummaryWriter

    tensorboard = SummaryWriter(str(directory))
    writer = MetricsWriter(heatmap_every)
    for step in range(1, steps + 1):
        counts = [c * step for c in COUNTS]  # same relative loads, more tokens
        metrics = lf_metrics.step_metrics([3, 5], counts, placements=[lf_metrics.expert_ranks(4, 2),
                                                                       lf_metrics.expert_ranks(2, 2)])
        writer.write(step, metrics, ([3, 5], counts), tensorboard=tensorboard)
    tensorboard.close()


def test_writer_round_trip_of_scalars_and_load_matrices(tmp_path):
    _write_run(tmp_path / "arm")
    run = read_run(tmp_path / "arm", "arm")
    # The load matrix every heatmap_every steps, from the first call on.
    assert [step for step, _ in run.loads] == [1, 4, 7]
    for _, matrix in run.loads:
        assert matrix.dtype == np.float16 and matrix.shape == (2, 5)
        assert matrix[:, 0].tolist() == [3.0, 5.0]
        np.testing.assert_array_equal(matrix[:, 1:].astype(np.float64), np.array(RELATIVE))
    # Scalars: every step, under the names of metrics.METRICS.
    assert run.series("maxvio_batch", 3) == (list(range(1, 8)), [1.0] * 7)  # (4 - 2) / 2
    assert run.series("maxvio_batch", 5)[1] == [0.5] * 7
    assert run.series("maxvio_batch")[1] == [0.75] * 7
    # EP 2: layer 3's ranks get 2 and 6 tokens (per step unit), mean 4 -> 1.5; layer 5: 3 / 2.
    assert run.series("ep_overload", 3)[1] == [1.5] * 7
    assert run.series("ep_overload_max")[1] == [1.5] * 7
    assert run.layers("maxvio_batch") == [3, 5]


def test_heatmap_image_colours_by_hand():
    loads = np.array([[1, 1.0, 4.0, 0.25, np.nan], [2, 2.0, 0.5, 8.0, 0.0]], dtype=np.float16)
    image = heatmap_rgb(loads, cell=2)
    assert image.shape == (4, 8, 3) and image.dtype == np.uint8
    cell = image[::2, ::2]  # one pixel per (layer, expert)
    assert cell[0, 0].tolist() == [255, 255, 255]  # at the mean
    assert cell[0, 1].tolist() == [255, 38, 38]  # 4x the mean: fully red
    assert cell[0, 2].tolist() == [38, 38, 255]  # a quarter: fully blue
    assert cell[0, 3].tolist() == [153, 153, 153]  # no such expert
    assert cell[1, 0].tolist() == [255, 147, 147]  # 2x: half way, 255 * (1 - 0.5 * 0.85)
    assert cell[1, 2].tolist() == [255, 38, 38] and cell[1, 3].tolist() == [38, 38, 255]  # clipped


def test_heatmap_every_is_checked():
    with pytest.raises(ValueError, match="heatmap_every: must be an integer >= 0, got -1"):
        MetricsWriter(-1)
    writer = MetricsWriter(0)
    assert not writer.heatmap_due(1)


def test_report_command_draws_the_figure(tmp_path, capsys):
    import matplotlib.image

    _write_run(tmp_path / "run" / "tensorboard" / "loss_free")
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "figures")]) == 0
    figure = tmp_path / "figures" / "report_loss_free.png"
    assert str(figure) in capsys.readouterr().err
    assert figure.stat().st_size > 20_000
    pixels = (matplotlib.image.imread(str(figure))[..., :3] * 255).round().astype(int)
    colours = {tuple(p) for p in pixels.reshape(-1, 3)[::7]}
    assert len(colours) > 50  # not a blank or one-colour canvas
    # The heatmap's extremes (relative load 2 and 0 -> clipped at 1/4) are drawn.
    red = (pixels[..., 0] > 150) & (pixels[..., 2] < 100)
    blue = (pixels[..., 2] > 80) & (pixels[..., 0] < 40)
    assert red.sum() > 1000 and blue.sum() > 1000


def test_report_refuses_what_it_cannot_read(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "RUN_DIR: no such file or directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "holds neither a results.json nor TensorBoard event files" in capsys.readouterr().err
