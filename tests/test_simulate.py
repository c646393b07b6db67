"""The offline simulator: exact top-K counts, the package's update math, the command."""

import json
import math
from pathlib import Path

import pytest
import torch

from nemo_lossfree.apps.cli import main
from nemo_lossfree.apps.simulator import (
    CandidateTopK,
    Environment,
    RecordedPool,
    SyntheticPool,
    recommend,
    reference_counts,
    scan_rates,
    simulate,
    strategy_config,
)
from nemo_lossfree.metrics import max_violation
from nemo_lossfree.update import compute_bias_update


@pytest.mark.parametrize("score_function", ["sigmoid", "softmax"])
def test_candidate_counts_equal_full_topk_under_any_offset(score_function):
    pool = SyntheticPool(num_tokens=2048, num_experts=32, score_function=score_function, skew=0.5, seed=3)
    engine = CandidateTopK(pool.rows, pool.num_tokens, 32, topk=4, candidates=12, block_tokens=512)
    scores = pool.rows(0, pool.num_tokens)
    spread = float(scores.std())
    generator = torch.Generator().manual_seed(0)
    blocks = torch.tensor([3, 0, 1])
    rows = torch.cat([scores[b * 512:(b + 1) * 512] for b in blocks.tolist()])
    # Offsets from tiny to far larger than the scores: the cached path, the
    # per-token fallback and the block refresh all get exercised.
    for scale in (0.0, 0.01, 0.1, 0.3, 1.0, 3.0, 0.05, 0.0):
        offset = torch.randn(32, generator=generator) * scale * spread
        assert torch.equal(engine.counts(offset, blocks), reference_counts(rows, offset, 4)), scale
    assert engine.fallback_tokens > 0 and engine.refreshed_blocks > len(blocks)


def test_one_step_is_the_packages_update():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 256, 16, generator=generator) + torch.linspace(-1, 1, 16)
    pool = RecordedPool(logits[0], kind="logits", score_function="sigmoid")
    env = Environment([pool], topk=2, tokens_per_step=256, steps=2)
    config = strategy_config("proportional", rate=1e-2, steps=2)
    trace = simulate(env, config)

    counts0 = reference_counts(torch.sigmoid(logits[0]), torch.zeros(16), 2)
    assert trace.maxvio[0] == pytest.approx(float(max_violation(counts0)))
    bias1 = compute_bias_update(counts0, torch.zeros(16), rate=1e-2, rule="proportional", center=True)
    counts1 = reference_counts(torch.sigmoid(logits[0]), bias1, 2)
    assert trace.maxvio[1] == pytest.approx(float(max_violation(counts1)))
    assert trace.rate == [1e-2, 1e-2]


def test_bias_balances_a_skewed_router_and_centering_changes_no_decision():
    pool = SyntheticPool(num_tokens=8192, num_experts=16, skew=1.0, seed=0)
    env = Environment([pool], topk=2, tokens_per_step=2048, steps=150, seed=0)
    plain = simulate(env, strategy_config("sign", rate=3e-3, steps=150))
    centered = simulate(env, strategy_config("centered", rate=3e-3, steps=150))
    assert plain.maxvio[0] > 0.5
    assert centered.steady_maxvio() < 0.25 * centered.maxvio[0]
    # Top-K on s + b ignores a common shift of b: same routing up to float rounding.
    assert max(abs(a - b) for a, b in zip(plain.maxvio, centered.maxvio)) < 1e-3 + 4 * 16 / (2048 * 2)
    assert abs(centered.bias_mean[-1]) < 1e-6 < abs(plain.bias_mean[-1])


def test_freeze_stops_the_bias_and_inverse_time_decays_the_rate():
    pool = SyntheticPool(num_tokens=4096, num_experts=8, skew=0.5, seed=2)
    env = Environment([pool], topk=2, tokens_per_step=1024, steps=40, seed=1)
    frozen = simulate(env, strategy_config("freeze", rate=1e-2, steps=40))
    assert frozen.rate[19] == 1e-2 and frozen.rate[20] == 0.0
    assert frozen.bias_spread[20:] == [frozen.bias_spread[19]] * 20
    decayed = simulate(env, strategy_config("inverse_time", rate=1e-2, steps=40))
    assert decayed.rate[0] == 1e-2 and decayed.rate[-1] == pytest.approx(1e-2 / (1 + 39 / 4))


def test_recommendation_is_the_rate_with_least_regret():
    pool = SyntheticPool(num_tokens=4096, num_experts=16, skew=1.0, seed=4)
    env = Environment([pool], topk=2, tokens_per_step=1024, steps=60, seed=4)
    traces = scan_rates(env, [1e-5, 1e-3, 3e-2], base=strategy_config("centered", rate=1e-3, steps=60))
    choice = recommend(traces, target=10.0)  # every rate reaches it: the least regret decides
    best = min(traces, key=lambda t: t.regret())
    assert choice["update_rate"] == best.config.update_rate
    # A rate of 1e-5 barely moves the bias in 60 steps: it cannot be the choice.
    assert choice["update_rate"] != 1e-5
    assert traces[0].regret() > best.regret()


def test_recommendation_meets_its_own_target_first():
    """A rate with less regret that never reaches the target loses to one that does."""
    from nemo_lossfree.apps.simulator.dynamics import Trace

    def trace(rate, maxvio):
        return Trace(name=f"rate={rate}", config=strategy_config("centered", rate=rate, steps=len(maxvio)),
                     maxvio=maxvio)

    # 3e-2 drops fast but hovers above 0.2; 1e-2 is slower and gets below it.
    fast = trace(3e-2, [1.0] + [0.25] * 39)
    slow = trace(1e-2, [2.0] * 15 + [0.15] * 25)
    assert fast.regret() < slow.regret()
    choice = recommend([fast, slow], target=0.2, window=10)
    assert choice["update_rate"] == 1e-2 and choice["steps_to_target"] == 15
    assert choice["criterion"].startswith("reaches MaxVio_batch 0.2")
    nobody = recommend([fast], target=0.1, window=10)
    assert nobody["update_rate"] == 3e-2 and nobody["criterion"].startswith("no rate reaches")


def test_quantile_strategy_balances_without_a_rate():
    pool = SyntheticPool(num_tokens=8192, num_experts=32, skew=1.0, seed=6)
    env = Environment([pool], topk=4, tokens_per_step=4096, steps=30, drift=1e-3, seed=6)
    quantile = simulate(env, strategy_config("quantile", rate=123.0, steps=30))
    assert quantile.config.update_rule == "quantile" and quantile.config.update_rate == 0.5
    assert quantile.maxvio[0] > 1.0
    assert quantile.steady_maxvio() < 0.15
    # The histogram's counts are the counts the other strategies see.
    assert env.counts(0, torch.zeros(32)).sum() == 4096 * 4


def test_command_on_recorded_scores_writes_json_and_png(tmp_path, capsys):
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 512, 8, generator=generator) + torch.linspace(-1, 1, 8)
    path = tmp_path / "router_logits.pt"
    torch.save({"logits": logits}, path)
    out = tmp_path / "sim"
    code = main(["simulate", "--scores", str(path), "--topk", "2", "--tokens", "512", "--steps", "12",
                 "--rates", "1e-3", "1e-2", "--strategies", "centered", "freeze", "--out-dir", str(out)])
    assert code == 0
    document = json.loads((out / "simulate.json").read_text())
    assert document["source"] == {"kind": "recorded", "file": str(path), "recorded_steps": 3,
                                  "recorded_tokens": 512, "drift": 1e-4, "noise": 0.0, "experts": 8}
    assert [s["name"] for s in document["strategies"]] == ["centered", "freeze"]
    assert document["recommendation"]["update_rate"] in (1e-3, 1e-2)
    assert all(len(v) == 12 for v in document["traces"].values())
    assert (out / "simulate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "recommended update rate" in capsys.readouterr().out


def test_command_on_synthetic_scores_reports_throughput(tmp_path):
    code = main(["simulate", "--experts", "32", "--topk", "4", "--tokens", "2048", "--steps", "20",
                 "--score-function", "softmax", "--rates", "1e-4", "1e-3", "--noise", "1e-4",
                 "--no-plot", "--out-dir", str(tmp_path)])
    assert code == 0
    document = json.loads((tmp_path / "simulate.json").read_text())
    assert document["shape"] == {"experts": 32, "topk": 4, "tokens_per_step": 2048, "steps": 20,
                                 "score_function": "softmax"}
    assert len(document["strategies"]) == 7  # every strategy, quantile balancing included
    throughput = document["throughput"]
    assert throughput["threads"] == 1
    assert throughput["token_routings_per_s"] == pytest.approx(4 * throughput["tokens_per_s"])
    assert math.isfinite(throughput["tokens_per_s"]) and throughput["tokens_per_s"] > 0
    assert not (tmp_path / "simulate.png").exists()


def test_command_rejects_bad_input(tmp_path, capsys):
    assert main(["simulate", "--experts", "4", "--topk", "5", "--out-dir", str(tmp_path)]) == 2
    assert "--topk" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save(torch.zeros(4), bad)
    assert main(["simulate", "--scores", str(bad), "--out-dir", str(tmp_path)]) == 2
    assert "[steps, tokens, experts]" in capsys.readouterr().err
    assert main(["simulate", "--scores", str(tmp_path / "missing.pt"), "--out-dir", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--strategies", "cosine-ish"])
    assert "invalid choice" in capsys.readouterr().err


def test_command_checks_the_output_dir_before_computing(tmp_path, capsys, monkeypatch):
    import nemo_lossfree.apps.simulator as simulator

    def no_work(*args, **kwargs):
        raise AssertionError("simulated before checking --out-dir")

    monkeypatch.setattr(simulator, "compare_strategies", no_work)
    (tmp_path / "a-file").write_text("")
    for out_dir in [tmp_path / "a-file" / "x"] + ([Path("/proc/x")] if Path("/proc/self").exists() else []):
        code = main(["simulate", "--experts", "8", "--topk", "2", "--tokens", "64", "--steps", "2",
                     "--no-plot", "--out-dir", str(out_dir)])
        assert code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"nemo-lossfree simulate: --out-dir: cannot create or write {out_dir}"), err
        assert len(err.splitlines()) == 1


def test_command_on_a_file_that_is_not_a_torch_file_names_scores(tmp_path, capsys):
    import datetime
    import pickle

    files = {"text.pt": b"steps,tokens\n1,2\n", "empty.pt": b"", "zip.pt": b"PK\x03\x04junk",
             "object.pt": pickle.dumps({"logits": datetime.date(2024, 1, 1)})}  # a pickle, not tensors
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        code = main(["simulate", "--scores", str(path), "--no-plot", "--out-dir", str(tmp_path / "out")])
        assert code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"nemo-lossfree simulate: --scores {path}: not a torch file"), err
        assert len(err.splitlines()) == 1, err
