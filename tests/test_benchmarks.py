"""The benchmark scripts in quick mode: they run and report well-formed results.

No timing is asserted (shared CI machines); what is asserted is what the
benchmarks themselves check: the same routing decisions as upstream, one
collective per balancer step, identical replicas, upstream's failure on
mixed expert counts.
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, *args, timeout=300):
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", name), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout


def positive(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_router_overhead_quick(tmp_path):
    out = tmp_path / "router.json"
    stdout = run_script("router_overhead.py", "--quick", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["benchmark"] == "router_overhead" and result["dtype"] == "fp32"
    assert result["machine"]["torch_threads"] == 1
    assert [row["scope"] for row in result["rows"]] == ["router", "routing"]
    for row in result["rows"]:
        assert set(row["median_ms"]) == {"lossfree", "upstream_bias", "upstream_aux"}
        assert all(positive(v) for v in row["median_ms"].values())
        assert positive(row["ratio_vs_upstream_bias"]) and positive(row["ratio_vs_upstream_aux"])
        assert row["same_selection_as_upstream_bias"] is True
    assert "| T x H x E x K |" in stdout


def test_router_overhead_rejects_a_bad_shape():
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "router_overhead.py"), "--shapes", "64x8x4"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2
    assert "TOKENSxHIDDENxEXPERTSxTOPK" in completed.stderr


def test_balancer_cost_quick_two_ranks(tmp_path):
    out = tmp_path / "balancer.json"
    stdout = run_script("balancer_cost.py", "--quick", "--world-sizes", "2", "--json", str(out))
    result = json.loads(out.read_text())
    uniform, mixed = result["rows"]
    assert (uniform["world_size"], uniform["mixed"], mixed["mixed"]) == (2, False, True)
    assert uniform["routers"] == mixed["routers"] == 4  # 3 MoE layers + 1 MTP layer
    for row in (uniform, mixed):
        assert row["replicas_identical"] is True
        assert row["collectives_per_step"]["lossfree"] == {"all_reduce": 1, "total": 1}
        assert row["collectives_per_step"]["overlapped"] == {"all_reduce": 1, "total": 1}
        assert row["host_syncs_per_step"]["lossfree_nolog"] == {}  # a step that records no metrics
        assert row["host_syncs_per_step"]["lossfree"]  # a logging step reads its metrics back
        assert all(positive(v) for v in row["median_ms"].values())
    assert uniform["collectives_per_step"]["upstream"] == {"all_reduce": 1, "total": 1}
    assert positive(uniform["ratio_lossfree_vs_upstream"])
    assert mixed["expert_counts"] == [4, 16]
    assert "upstream" not in mixed["median_ms"] and "stack expects" in mixed["upstream_error"]
    assert "collectives / step" in stdout and "host syncs / step" in stdout


def test_demo_bias_headroom_tiny(tmp_path):
    from nemo_lossfree.testing.distributed import free_port

    from _support.demo_workers import TINY

    out = tmp_path / "headroom"
    stdout = run_script("demo_bias_headroom.py", "--out", str(out), "--port", str(free_port()),
                        "--steps", "3", *TINY, timeout=900)
    report = json.loads((out / "headroom.json").read_text())
    demo = json.loads((out / "loss_free.json").read_text())
    assert [row["layer"] for row in report["layers"]] == [1, 2]
    for row, demo_value in zip(report["layers"], demo["maxvio_global_per_layer"]):
        # The recorded scores plus the trained bias give back the demo's own counts.
        assert row["trained"] == pytest.approx(demo_value, abs=1e-9)
        assert 0 <= row["best_on_val"] <= row["trained"]
        assert row["train_fit_on_val"] >= 0 and row["batch_noise"] >= 0
        assert 0 <= row["hot_expert_space_share"] <= 1
    assert 0 < report["space_share_of_val_tokens"] < 1
    assert "| mean |" in stdout


def test_replay_rules_reproduces_the_recorded_run_bit_for_bit(tmp_path):
    from nemo_lossfree.testing.distributed import free_port

    from _support.demo_workers import TINY

    out = tmp_path / "replay"
    stdout = run_script("replay_rules.py", "--out", str(out), "--port", str(free_port()), "--steps", "4",
                        "--no-hindsight", "--candidates", "quantile u=1.0", "quantile adaptive [0, 1]",
                        *TINY, timeout=900)
    report = json.loads((out / "replay.json").read_text())
    # Replaying the recorded rule gives the trained biases exactly and the run's own MaxVio_global.
    assert report["replay_check"]["max_abs_bias_diff"] == 0.0
    assert report["replay_check"]["maxvio_global"] == pytest.approx(report["recorded"]["maxvio_global"], abs=1e-9)
    rules = report["rules"]
    assert set(rules) == {"quantile u=1.0", "quantile adaptive [0, 1]"}
    assert "gain_at_step" in rules["quantile adaptive [0, 1]"] and "gain_at_step" not in rules["quantile u=1.0"]
    assert all(0 <= r["maxvio_global"] and 0 <= r["maxvio_batch_mean"] for r in rules.values())
    assert "replay of the recorded rule" in stdout


def test_metrics_cost_quick(tmp_path):
    out = tmp_path / "metrics.json"
    stdout = run_script("metrics_cost.py", "--quick", "--json", str(out))
    result = json.loads(out.read_text())
    balancer, router = result["balancer"], result["router"]
    assert balancer["routers"] == 4 and balancer["experts"] == 16 and balancer["ep_for_overload"] == 4
    assert list(balancer["median_ms"]) == ["step_nolog", "step_log", "step_metrics", "write_scalars",
                                           "write_heatmap"]
    # 4 layers x (per-layer names, EP overload and health included) + the overall names.
    assert balancer["scalars_per_step"] > 4 * 20
    assert list(router["median_ms"]) == ["plain", "record_health", "score_recording"]
    for part in (balancer, router):
        assert all(positive(v) for v in part["median_ms"].values())
    assert "| step_log |" in stdout and "| record_health |" in stdout
