import pytest
import torch

from nemo_lossfree.metrics import bias_summary, dead_expert_fraction, max_violation, step_metrics


def test_max_violation_matches_the_definition():
    counts = torch.tensor([[10.0, 30.0, 20.0, 20.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    # (30 - 20) / 20 = 0.5; perfect balance 0; no tokens 0.
    assert max_violation(counts).tolist() == [0.5, 0.0, 0.0]
    assert max_violation(torch.tensor([0.0, 0.0, 0.0, 8.0])).item() == pytest.approx(3.0)


def test_dead_experts_and_summary():
    counts = torch.tensor([[0.0, 4.0, 4.0, 0.0]])
    assert dead_expert_fraction(counts).tolist() == [0.5]
    # Layer 3: MaxVio (6 - 4) / 4 = 0.5, no dead expert; layer 5: (10 - 4) / 4 = 1.5, half dead.
    out = step_metrics([3, 5], [torch.tensor([2.0, 6.0, 4.0, 4.0]), torch.tensor([0.0, 10.0, 6.0, 0.0])])
    assert out["lossfree/maxvio_batch"] == pytest.approx(1.0)
    assert out["lossfree/maxvio_batch_max"] == pytest.approx(1.5)
    assert out["lossfree/maxvio_batch_worst_layer"] == 5.0
    assert out["lossfree/dead_expert_fraction"] == pytest.approx(0.25)
    out = bias_summary([torch.tensor([1.0, -1.0]), torch.tensor([3.0, -3.0])])
    assert out["lossfree/bias_min"] == -3.0 and out["lossfree/bias_max"] == 3.0
    assert out["lossfree/bias_mean"] == 0.0
    assert out["lossfree/bias_std"] == pytest.approx(5.0 ** 0.5)


def test_max_violation_is_nan_where_counts_are_not_finite():
    # NaN counts are no evidence of balance: NaN, never 0.0 (perfect balance).
    nan, inf = float("nan"), float("inf")
    counts = torch.tensor([[10.0, nan, 20.0, 20.0], [5.0, 5.0, 5.0, 5.0], [-inf, 1.0, 1.0, 1.0], [inf, 1.0, 1.0, 1.0]])
    vio = max_violation(counts).tolist()
    assert vio[1] == 0.0
    assert all(v != v for v in (vio[0], vio[2], vio[3]))


# ------------------------------------------------------------ the metric names
def test_tag_builds_only_listed_names():
    from nemo_lossfree.metrics import METRICS, parse_tag, tag

    assert tag("maxvio_batch") == "lossfree/maxvio_batch"
    assert tag("maxvio_batch", 7) == "lossfree/maxvio_batch_layer_7"
    with pytest.raises(KeyError):
        tag("maxvio_batch_typo")
    with pytest.raises(KeyError):
        tag("bias_std", 3)  # an overall metric only
    with pytest.raises(KeyError):
        tag("top1_layer", 3)
    for m in METRICS:
        if m.overall:
            assert parse_tag(tag(m.key)) == (m.key, None)
        if m.per_layer:
            assert parse_tag(tag(m.key, 12)) == (m.key, 12)
    assert parse_tag("lossfree/unknown") is None and parse_tag("loss") is None


def test_docs_list_every_metric_name():
    from pathlib import Path

    from nemo_lossfree.metrics import metrics_table_markdown

    core = (Path(__file__).resolve().parents[1] / "docs" / "core.md").read_text()
    assert metrics_table_markdown() in core, "docs/core.md: paste metrics.metrics_table_markdown() again"


# ------------------------------------------------- step metrics on known counts
def _two_layers(**kwargs):
    """Layer 1: 4 experts on EP ranks [0, 0, 1, 1]; layer 3: 8 experts on [0]*4 + [1]*4 (mixed counts)."""
    from nemo_lossfree.metrics import expert_ranks, step_metrics

    counts = [torch.tensor([10.0, 30, 20, 20]), torch.tensor([8.0, 4, 0, 0, 1, 1, 1, 1])]
    return step_metrics([1, 3], counts, placements=[expert_ranks(4, 2), expert_ranks(8, 2)], **kwargs)


def test_distribution_per_layer_by_hand():
    out = _two_layers()
    # Layer 1: relative loads [0.5, 1.5, 1, 1]; sorted [0.5, 1, 1, 1.5].
    assert out["lossfree/maxvio_batch_layer_1"] == pytest.approx(0.5)
    assert out["lossfree/load_cv_layer_1"] == pytest.approx((0.5 ** 2 * 2 / 4) ** 0.5)
    assert out["lossfree/load_min_layer_1"] == 0.5 and out["lossfree/load_max_layer_1"] == 1.5
    assert out["lossfree/load_p5_layer_1"] == pytest.approx(0.5 + 0.15 * 0.5)  # position 0.05 * 3
    assert out["lossfree/load_median_layer_1"] == pytest.approx(1.0)
    assert out["lossfree/load_p95_layer_1"] == pytest.approx(1.0 + 0.85 * 0.5)  # position 2.85
    # Ties: the lower expert id first.
    assert [out[f"lossfree/top{k}_expert_layer_1"] for k in (1, 2, 3)] == [1, 2, 3]
    assert [out[f"lossfree/top{k}_load_layer_1"] for k in (1, 2, 3)] == [1.5, 1.0, 1.0]
    assert [out[f"lossfree/bottom{k}_expert_layer_1"] for k in (1, 2, 3)] == [0, 2, 3]
    # Layer 3: relative loads [4, 2, 0, 0, .5, .5, .5, .5].
    assert out["lossfree/maxvio_batch_layer_3"] == pytest.approx(3.0)
    assert out["lossfree/load_cv_layer_3"] == pytest.approx((13 / 8) ** 0.5)
    assert out["lossfree/load_median_layer_3"] == pytest.approx(0.5)
    assert out["lossfree/load_p95_layer_3"] == pytest.approx(2 + 0.65 * 2)  # position 6.65
    assert [out[f"lossfree/top{k}_expert_layer_3"] for k in (1, 2, 3)] == [0, 1, 4]
    assert [out[f"lossfree/bottom{k}_expert_layer_3"] for k in (1, 2, 3)] == [2, 3, 4]
    assert [out[f"lossfree/bottom{k}_load_layer_3"] for k in (1, 2, 3)] == [0.0, 0.0, 0.5]


def test_distribution_over_layers_by_hand():
    out = _two_layers()
    assert out["lossfree/maxvio_batch"] == pytest.approx(1.75)
    assert out["lossfree/maxvio_batch_max"] == pytest.approx(3.0)
    assert out["lossfree/maxvio_batch_worst_layer"] == 3
    assert out["lossfree/dead_expert_fraction"] == pytest.approx((0 + 2 / 8) / 2)
    # Pooled relative loads of both layers (12 values, mean 1).
    assert out["lossfree/load_cv"] == pytest.approx(((0.25 * 2 + 13) / 12) ** 0.5)
    assert out["lossfree/load_min"] == 0.0 and out["lossfree/load_max"] == 4.0
    assert out["lossfree/load_median"] == pytest.approx(0.5)
    assert out["lossfree/load_p95"] == pytest.approx(2 + 0.45 * 2)  # position 10.45 of 0..11
    top = [(out[f"lossfree/top{k}_layer"], out[f"lossfree/top{k}_expert"], out[f"lossfree/top{k}_load"])
           for k in (1, 2, 3)]
    assert top == [(3, 0, 4.0), (3, 1, 2.0), (1, 1, 1.5)]
    bottom = [(out[f"lossfree/bottom{k}_layer"], out[f"lossfree/bottom{k}_expert"]) for k in (1, 2, 3)]
    assert bottom == [(3, 2), (3, 3), (1, 0)]


def test_ep_overload_with_megatrons_placement_and_mixed_expert_counts():
    from nemo_lossfree.metrics import expert_ranks

    assert expert_ranks(8, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert expert_ranks(6, 3).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match=r"expert_model_parallel_size: must divide num_moe_experts \(6\), got 4"):
        expert_ranks(6, 4)
    out = _two_layers()
    assert out["lossfree/ep_overload_layer_1"] == pytest.approx(1.0)  # ranks 40 / 40
    assert out["lossfree/ep_overload_layer_3"] == pytest.approx(12 / 8)  # ranks 12 / 4
    assert out["lossfree/ep_overload"] == pytest.approx(1.25)
    assert out["lossfree/ep_overload_max"] == pytest.approx(1.5)


def test_ep_overload_with_an_uneven_placement():
    from nemo_lossfree.metrics import ep_overload, ep_rank_loads, step_metrics

    counts = torch.tensor([1.0, 1, 1, 3, 3, 0])
    ranks = torch.tensor([0, 0, 0, 1, 1, 2])  # 3, 2 and 1 experts
    assert ep_rank_loads(counts, ranks).tolist() == [3.0, 6.0, 0.0]
    assert ep_overload(counts, ranks).item() == pytest.approx(6 / 3)
    # A fourth rank without experts counts in the mean.
    assert ep_overload(counts, ranks, ep_size=4).item() == pytest.approx(6 / 2.25)
    assert ep_overload(torch.zeros(6), ranks).item() == 1.0  # no tokens: no overload
    out = step_metrics([5], [counts], placements=[ranks])
    assert out["lossfree/ep_overload_layer_5"] == pytest.approx(2.0)
    # The same placement again (the balancer's every logging step): its device copy is reused.
    assert step_metrics([5], [counts * 2], placements=[ranks])["lossfree/ep_overload_layer_5"] == pytest.approx(2.0)
    assert "lossfree/ep_overload_layer_5" not in step_metrics([5], [counts])  # EP 1: not written


def test_bias_load_correlation_and_empty_layers():
    out = _two_layers(biases=[torch.tensor([1.0, -1, 0, 0]), torch.zeros(8)])
    # dy = [-10, 10, 0, 0] against the bias [1, -1, 0, 0]: exactly -1.
    assert out["lossfree/bias_load_corr_layer_1"] == pytest.approx(-1.0)
    assert "lossfree/bias_load_corr_layer_3" not in out  # a constant bias has no correlation
    assert out["lossfree/bias_load_corr"] == pytest.approx(-1.0)

    from nemo_lossfree.metrics import step_metrics

    empty = step_metrics([1, 2], [torch.zeros(4), torch.tensor([1.0, 3.0, 0, 0])])
    assert empty["lossfree/maxvio_batch_layer_1"] == 0.0
    assert "lossfree/load_cv_layer_1" not in empty  # no tokens: no distribution
    assert empty["lossfree/load_max"] == 3.0  # the pooled loads are layer 2's alone


def test_routing_health_by_hand():
    from nemo_lossfree.metrics import routing_health, step_metrics

    # 4 tokens = 2 positions x 2 sequences (token t is sequence t % 2); token 3 is padding.
    biased = torch.tensor([[0.9, 0.8, 0.1, 0.0],
                           [0.2, 0.6, 0.5, 0.3],
                           [0.4, 0.1, 0.7, 0.65],
                           [0.9, 0.1, 0.1, 0.8]])
    selected = torch.zeros(4, 4, dtype=torch.bool).scatter_(1, biased.topk(2).indices, True)
    unbiased = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)
    padding = torch.tensor([False, False, False, True])
    health = routing_health(biased, selected, unbiased, padding_T=padding, seq_length=2)
    assert health[:4].tolist() == [1.0, 1.0, 3.0, 1.0]  # unbiased counts, padding left out
    tokens, kept, margin, sequences, seq_vio = health[4:].tolist()
    assert (tokens, kept, sequences) == (3, 5, 2)
    assert margin == pytest.approx(0.7 + 0.2 + 0.25)  # K-th minus (K+1)-th biased score
    # Sequence 0: tokens 0 and 2 -> [1, 1, 1, 1], MaxVio 0; sequence 1: token 1 -> [0, 1, 1, 0], MaxVio 1.
    assert seq_vio == pytest.approx(1.0)
    # Group-limited routing: token 0 may not pick expert 2, so its runner-up is expert 3.
    allowed = torch.ones(4, 4, dtype=torch.bool)
    allowed[0, 2] = False
    limited = routing_health(biased, selected, unbiased, padding_T=padding, allowed_TE=allowed, seq_length=2)
    assert limited[6].item() == pytest.approx(0.8 + 0.2 + 0.25)

    # Two micro-batches (or ranks) add up; the metrics divide once.
    out = step_metrics([4], [selected[:3].sum(0).float() * 2], health=[health * 2], topks=[2])
    assert out["lossfree/topk_overlap_layer_4"] == pytest.approx(5 / 6)
    assert out["lossfree/topk_margin_layer_4"] == pytest.approx(1.15 / 3)
    assert out["lossfree/maxvio_seq_layer_4"] == pytest.approx(0.5)
    assert out["lossfree/maxvio_unbiased_layer_4"] == pytest.approx((3 - 1.5) / 1.5)
    assert out["lossfree/topk_overlap"] == pytest.approx(5 / 6)
    # A layer whose router recorded nothing reports no health.
    silent = step_metrics([4], [torch.ones(4)], health=[torch.zeros(9)], topks=[2])
    assert not any(k.startswith(("lossfree/topk_", "lossfree/maxvio_seq", "lossfree/maxvio_unb")) for k in silent)


def test_load_matrix_pads_mixed_expert_counts():
    import numpy as np

    from nemo_lossfree.metrics import load_matrix

    matrix = load_matrix([1, 3], [torch.tensor([10.0, 30, 20, 20]), torch.tensor([8.0, 4, 0, 0, 1, 1, 1, 1])])
    assert matrix.dtype == np.float16 and matrix.shape == (2, 9)
    assert matrix[:, 0].tolist() == [1, 3]
    assert matrix[0, 1:5].tolist() == [0.5, 1.5, 1.0, 1.0] and np.isnan(matrix[0, 5:]).all()
    assert matrix[1, 1:].tolist() == [4, 2, 0, 0, 0.5, 0.5, 0.5, 0.5]


# ----------------------------------- the balancer's metrics on a real GPTModel
def test_balancer_health_matches_a_plain_recomputation_on_logging_steps_only(single_rank, monkeypatch):
    """Router health recorded on logging steps only, equal to plain torch on the routers' own inputs."""
    from nemo_lossfree import LossFreeBalancer, LossFreeConfig
    from nemo_lossfree.metrics import max_violation
    from nemo_lossfree.router import LossFreeRouter
    from nemo_lossfree.testing.models import gpt_moe_model, moe_transformer_config

    torch.manual_seed(0)
    seq, batch, topk = 16, 3, 2
    config = moe_transformer_config(num_layers=2, num_experts=8, topk=topk)
    model = gpt_moe_model(config, vocab_size=64, max_sequence_length=seq)
    balancer = LossFreeBalancer(model, LossFreeConfig(log_every=2))  # the quantile rule at 0.5
    routers = balancer.routers
    inputs = {i: [] for i in range(len(routers))}
    for i, router in enumerate(routers):
        router.register_forward_hook(
            lambda module, args, output, i=i: inputs[i].append((args[0].detach().clone(),
                                                                 module.expert_bias.clone())))
    health_calls = []
    original_health = LossFreeRouter.health
    monkeypatch.setattr(LossFreeRouter, "health", lambda self, *a: health_calls.append(1) or original_health(self, *a))
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        for values in inputs.values():
            values.clear()
        health_calls.clear()
        assert all(r.record_health == (step % 2 == 0) for r in routers)
        for _ in range(2):  # two micro-batches
            ids = torch.randint(0, 64, (batch, seq), generator=gen)
            pos = torch.arange(seq).unsqueeze(0).expand(batch, seq)
            model(ids, pos, None, labels=ids).float().mean().backward()
        if step % 2:
            assert not health_calls and all(r.local_health.abs().sum() == 0 for r in routers)
            assert balancer.step() == {}
            continue
        assert len(health_calls) == 2 * len(routers)
        metrics = balancer.step()
        assert all(r.local_health.abs().sum() == 0 for r in routers)
        for i, router in enumerate(routers):
            layer = router.layer_number
            kept = margins = tokens = 0.0
            seq_vio, unbiased_counts = [], torch.zeros(8, dtype=torch.float64)
            for hidden, bias in inputs[i]:
                scores = torch.sigmoid(hidden.reshape(-1, hidden.shape[-1]).float() @ router.weight.float().t())
                biased = scores + bias
                top = biased.topk(topk + 1, dim=-1)
                chosen = torch.zeros_like(biased, dtype=torch.bool).scatter_(1, top.indices[:, :topk], True)
                plain = torch.zeros_like(chosen).scatter_(1, scores.topk(topk, dim=-1).indices, True)
                kept += (chosen & plain).sum().item()
                margins += (top.values[:, topk - 1] - top.values[:, topk]).sum().item()
                tokens += scores.shape[0]
                seq_vio += max_violation(chosen.view(seq, batch, 8).sum(0).float()).tolist()
                unbiased_counts += plain.sum(0).double()
            assert metrics[f"lossfree/topk_overlap_layer_{layer}"] == pytest.approx(kept / (tokens * topk))
            assert metrics[f"lossfree/topk_margin_layer_{layer}"] == pytest.approx(margins / tokens, rel=1e-5)
            assert metrics[f"lossfree/maxvio_seq_layer_{layer}"] == pytest.approx(sum(seq_vio) / len(seq_vio))
            assert metrics[f"lossfree/maxvio_unbiased_layer_{layer}"] == pytest.approx(
                max_violation(unbiased_counts).item())
            if step == 0:  # zero bias: the biased choice is the unbiased one
                assert metrics[f"lossfree/topk_overlap_layer_{layer}"] == 1.0
        assert balancer.last_loads[0] == [r.layer_number for r in routers]
    assert any(metrics[f"lossfree/topk_overlap_layer_{r.layer_number}"] < 1 for r in routers)
