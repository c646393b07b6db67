import pytest
import torch

from nemo_lossfree.metrics import dead_expert_fraction, max_violation, summarize


def test_max_violation_matches_the_definition():
    counts = torch.tensor([[10.0, 30.0, 20.0, 20.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    # (30 - 20) / 20 = 0.5; perfect balance 0; no tokens 0.
    assert max_violation(counts).tolist() == [0.5, 0.0, 0.0]
    assert max_violation(torch.tensor([0.0, 0.0, 0.0, 8.0])).item() == pytest.approx(3.0)


def test_dead_experts_and_summary():
    counts = torch.tensor([[0.0, 4.0, 4.0, 0.0]])
    assert dead_expert_fraction(counts).tolist() == [0.5]
    out = summarize([0.5, 1.5], [torch.tensor([1.0, -1.0]), torch.tensor([3.0, -3.0])], [0.0, 0.5])
    assert out["lossfree/maxvio_batch"] == pytest.approx(1.0)
    assert out["lossfree/maxvio_batch_max"] == pytest.approx(1.5)
    assert out["lossfree/bias_min"] == -3.0 and out["lossfree/bias_max"] == 3.0
    assert out["lossfree/bias_mean"] == 0.0
    assert out["lossfree/bias_std"] == pytest.approx(5.0 ** 0.5)
    assert out["lossfree/dead_expert_fraction"] == pytest.approx(0.25)


def test_max_violation_is_nan_where_counts_are_not_finite():
    # NaN counts are no evidence of balance: NaN, never 0.0 (perfect balance).
    nan, inf = float("nan"), float("inf")
    counts = torch.tensor([[10.0, nan, 20.0, 20.0], [5.0, 5.0, 5.0, 5.0], [-inf, 1.0, 1.0, 1.0], [inf, 1.0, 1.0, 1.0]])
    vio = max_violation(counts).tolist()
    assert vio[1] == 0.0
    assert all(v != v for v in (vio[0], vio[2], vio[3]))
