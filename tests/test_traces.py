"""Routing traces (nemo_lossfree.traces) on a real GPTModel, replayed by ``nemo-lossfree simulate``."""

from __future__ import annotations

import json

import pytest
import torch


def _train(model, balancer, trace, steps, *, seq=16, batch=3, vocab=64):
    gen = torch.Generator().manual_seed(1)
    counts_at = {}
    for step in range(steps):
        traced = trace.begin_step(step)
        for _ in range(2):  # two micro-batches
            ids = torch.randint(0, vocab, (batch, seq), generator=gen)
            pos = torch.arange(seq).unsqueeze(0).expand(batch, seq)
            model(ids, pos, None, labels=ids).float().mean().backward()
        trace.end_step()
        balancer.step()
        if traced:
            counts_at[step] = [c.clone() for c in balancer.last_loads[1]]
    return counts_at


def test_trace_replays_the_counts_the_balancer_saw(single_rank, tmp_path):
    from nemo_lossfree import LossFreeBalancer, LossFreeConfig
    from nemo_lossfree.apps.simulator.scores import load_recorded
    from nemo_lossfree.testing.models import gpt_moe_model, moe_transformer_config
    from nemo_lossfree.traces import RoutingTrace

    torch.manual_seed(0)
    topk = 2
    model = gpt_moe_model(moe_transformer_config(num_layers=2, num_experts=8, topk=topk), vocab_size=64,
                          max_sequence_length=16)
    balancer = LossFreeBalancer(model, LossFreeConfig(log_every=1))
    trace = RoutingTrace(balancer.routers, every=2, dtype=torch.float32)
    counts_at = _train(model, balancer, trace, 5)
    assert trace.steps == [0, 2, 4] and all(r.score_recording is None for r in balancer.routers)
    paths = trace.save(tmp_path, rank=0)
    assert [p.name for p in paths] == [f"trace_layer{r.layer_number}_rank0.pt" for r in balancer.routers]
    for i, path in enumerate(paths):
        saved = torch.load(path, weights_only=True)
        assert saved["scores"].shape == (3, 2 * 3 * 16, 8) and saved["topk"] == topk
        assert saved["steps"].tolist() == [0, 2, 4]
        assert saved["bias"][0].abs().sum() == 0 and saved["bias"][1].abs().sum() > 0  # step 0 routes unbiased
        # Top-K of the recorded scores plus the recorded bias: exactly the counts the balancer reduced.
        for j, step in enumerate([0, 2, 4]):
            chosen = (saved["scores"][j] + saved["bias"][j]).topk(topk, dim=-1).indices
            counts = torch.bincount(chosen.reshape(-1), minlength=8).float()
            assert torch.equal(counts, counts_at[step][i]), (path.name, step)
        pools = load_recorded(str(path), kind=None, score_function="sigmoid")
        assert len(pools) == 3 and pools[0].num_tokens == 96 and pools[0].num_experts == 8
        assert torch.equal(pools[1].rows(0, 96), saved["scores"][1])


def test_trace_caps_tokens_stores_float16_and_feeds_simulate(single_rank, tmp_path, capsys):
    from nemo_lossfree import LossFreeBalancer, LossFreeConfig
    from nemo_lossfree.apps.cli import main
    from nemo_lossfree.testing.models import gpt_moe_model, moe_transformer_config
    from nemo_lossfree.traces import RoutingTrace

    torch.manual_seed(0)
    model = gpt_moe_model(moe_transformer_config(num_layers=1, num_experts=8, topk=2), vocab_size=64,
                          max_sequence_length=16)
    balancer = LossFreeBalancer(model, LossFreeConfig())
    trace = RoutingTrace(balancer.routers, every=3, max_tokens=40)  # 48 tokens per micro-batch
    _train(model, balancer, trace, 4)
    (path,) = trace.save(tmp_path, rank=1)
    saved = torch.load(path, weights_only=True)
    assert path.name == "trace_layer1_rank1.pt"
    assert saved["scores"].dtype == torch.float16 and saved["scores"].shape == (2, 40, 8)
    assert ((saved["scores"] > 0) & (saved["scores"] < 1)).all()  # sigmoid scores
    out = tmp_path / "sim"
    assert main(["simulate", "--scores", str(path), "--topk", "2", "--tokens", "40", "--steps", "6",
                 "--rates", "1e-3", "--strategies", "centered", "--no-plot", "--out-dir", str(out)]) == 0
    source = json.loads((out / "simulate.json").read_text())["source"]
    assert source["recorded_steps"] == 2 and source["recorded_tokens"] == 40 and source["experts"] == 8


def test_bad_trace_settings_are_refused_by_name(single_rank):
    from nemo_lossfree.traces import RoutingTrace

    with pytest.raises(ValueError, match="every: must be an integer >= 1, got 0"):
        RoutingTrace([], every=0)
    with pytest.raises(ValueError, match="max_tokens: must be an integer >= 1 or None, got -5"):
        RoutingTrace([], every=1, max_tokens=-5)
    with pytest.raises(ValueError, match="routers: no LossFreeRouter to trace"):
        RoutingTrace([torch.nn.Linear(2, 2)], every=1)
