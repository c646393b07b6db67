"""``nemo-lossfree demo`` end to end on a tiny model: results.json, plot, TensorBoard, table."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nemo_lossfree.apps.demo.arms import DEFAULT_ARMS as ARMS

from _support.demo_workers import TINY, run_workers_to_exit

# The fixture trains the default arms in 2 processes: seconds on idle cores, minutes on a loaded machine.
pytestmark = pytest.mark.timeout(1200)

BIAS_ARMS = ("loss_free", "megatron_bias", "megatron_qb")
STEPS = 4


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [sys.executable, "-m", "nemo_lossfree.apps.cli", "demo", "--out", str(out), "--steps", str(STEPS),
         "--quiet", *TINY, "--dense-layers", "1"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out, result.stdout


def test_results_json_has_every_arm_and_field(demo_run):
    out, _ = demo_run
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == list(ARMS)
    for arm, r in results["arms"].items():
        assert set(r) >= {"val_loss", "val_ppl", "maxvio_global", "maxvio_batch_last",
                          "steps_to_maxvio_batch_below_0.2", "wall_s"}, arm
        assert 0 < r["val_loss"] < math.log(256) + 0.5, arm  # bytes: at most ~uniform
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["maxvio_global"] >= 0 and r["maxvio_batch_last"] >= 0
        below = r["steps_to_maxvio_batch_below_0.2"]
        assert below is None or 1 <= below <= STEPS
        assert r["wall_s"] > 0
    config = results["config"]
    assert config["steps"] == STEPS and config["experts"] == 4 and config["topk"] == 2
    assert config["arms"] == list(ARMS) and config["expert_model_parallel_size"] == 2
    # A dense first layer (moe_layer_freq [0, 1, 1]): the MoE layers are Megatron's layers 2 and 3.
    assert config["dense_layers"] == 1
    metrics = json.loads((out / "loss_free.json").read_text())["last_step_metrics"]
    assert {"lossfree/maxvio_batch_layer_2", "lossfree/maxvio_batch_layer_3"} <= set(metrics)
    assert "lossfree/maxvio_batch_layer_1" not in metrics


def test_arms_start_from_the_same_model_and_data(demo_run):
    out, _ = demo_run
    first_losses = [json.loads((out / f"{arm}.json").read_text())["history"]["loss"][0] for arm in ARMS]
    # Step 1 is the same forward for every arm: same weights, same batch, zero biases;
    # the aux loss is not part of the language-modelling loss.
    assert max(first_losses) - min(first_losses) < 1e-5, first_losses
    later = [json.loads((out / f"{arm}.json").read_text())["history"]["loss"][-1] for arm in ARMS]
    assert len(set(later)) > 1  # and the arms do train differently


def test_biases_of_the_bias_arms(demo_run):
    out, _ = demo_run
    for arm in ARMS:
        data = json.loads((out / f"{arm}.json").read_text())
        if arm in BIAS_ARMS:
            assert len(data["final_bias"]) == 2 and all(len(b) == 4 for b in data["final_bias"])
            assert any(abs(x) > 0 for b in data["final_bias"] for x in b), arm
        else:
            assert data["final_bias"] is None, arm
    loss_free = json.loads((out / "loss_free.json").read_text())
    for layer in loss_free["final_bias"]:  # centered after every update
        assert abs(sum(layer) / len(layer)) < 1e-6
    assert loss_free["balancer_state"]["steps_done"] == STEPS


def test_plot_tensorboard_and_console_table(demo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, stdout = demo_run
    assert (out / "demo.png").stat().st_size > 10_000
    for arm in ARMS:
        events = EventAccumulator(str(out / "tensorboard" / arm))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        # Megatron's layer numbers: layer 1 is the dense one.
        assert {"loss", "lossfree/maxvio_batch", "lossfree/maxvio_batch_layer_2",
                "lossfree/maxvio_batch_layer_3"} <= tags, (arm, tags)
        assert [e.step for e in events.Scalars("loss")] == list(range(1, STEPS + 1))
        if arm in BIAS_ARMS:
            assert {"lossfree/bias_std", "lossfree/bias_max"} <= tags, arm
        # The load matrix (heatmap_every(4) = 1: every step) and its image, MoE layers 2 and 3 only.
        loads = events.Tensors("lossfree/loads")
        assert [e.step for e in loads] == list(range(1, STEPS + 1)), arm
        assert "lossfree/load_heatmap" in events.Tags()["images"], arm
    for arm in ARMS:
        assert arm in stdout
    assert "MaxVio_global" in stdout
    assert "loss at matched balance: loss_free" in stdout


def test_report_figures_per_arm(demo_run):
    import matplotlib.image

    from nemo_lossfree.apps.report.events import read_run

    out, stdout = demo_run
    assert "report_<arm>.png" in stdout
    for arm in ARMS:
        figure = out / f"report_{arm}.png"
        assert figure.stat().st_size > 20_000, arm
        pixels = matplotlib.image.imread(str(figure))[..., :3]
        assert len(np.unique(pixels.reshape(-1, 3)[::5], axis=0)) > 50, arm  # more than a blank canvas
        run = read_run(out / "tensorboard" / arm, arm)
        for _, matrix in run.loads:  # Megatron's layer numbers; relative loads average 1
            assert matrix[:, 0].tolist() == [2.0, 3.0], arm
            assert np.allclose(matrix[:, 1:].astype(np.float64).mean(axis=1), 1.0, atol=2e-3), arm


def test_pareto_against_the_aux_loss_frontier(demo_run):
    out, _ = demo_run
    pareto = json.loads((out / "results.json").read_text())["pareto"]
    frontier = pareto["frontier"]
    assert sorted(p["aux_coeff"] for p in frontier) == [1e-3, 1e-2, 1e-1]
    assert [p["maxvio_global"] for p in frontier] == sorted(p["maxvio_global"] for p in frontier)
    mine = pareto["loss_free"]
    assert mine["where"] in ("inside the frontier's range", "more balanced than every aux-loss arm",
                             "less balanced than every aux-loss arm")
    assert (mine["frontier_val_loss_at_matched_balance"] is None) == (mine["where"] != "inside the frontier's range")


def test_report_command_prints_the_table(demo_run):
    out, _ = demo_run
    result = subprocess.run([sys.executable, "-m", "nemo_lossfree.apps.cli", "report", str(out),
                             "--format", "markdown", "--no-plots"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("| arm | val loss")
    assert [line.split("|")[1].strip() for line in lines[2:2 + len(ARMS)]] == list(ARMS)
    assert lines[-1].startswith("loss at matched balance")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arms", "loss_free,sinkhorn"], "arms: unknown arm 'sinkhorn'; choose from loss_free"),
        (["--topk", "5", "--experts", "4"], "topk: must be <= experts (4), got 5"),
        (["--lossfree", "update_rule=cubic"], "lossfree.update_rule: must be one of quantile, sign, proportional"),
        (["--dense-layers", "-1"], "dense_layers: must be an integer >= 0, got -1"),
        (["--lossfree", "integral_decay=1"], "lossfree.integral_decay: must be a number in [0, 1), got 1.0"),
        (["--lr", "-1"], "lr: must be a finite number > 0, got -1.0"),
        (["--lr", "nan"], "lr: must be a finite number > 0, got nan"),
        (["--lr", "1e-3", "--min-lr", "2e-3"], "min_lr: must be a finite number in [0, lr (0.001)], got 0.002"),
        (["--min-lr", "-0.0001"], "min_lr: must be a finite number in [0, lr (0.003)], got -0.0001"),
        (["--lr-warmup-steps", "-5"], "lr_warmup_steps: must be an integer >= 0, got -5"),
        (["--save", "{tmp}/ckpt", "--save-interval", "0"], "save_interval: must be an integer >= 1, got 0"),
        (["--save-interval", "5"],
         "save_interval: must come with --save (the checkpoint root), got --save-interval 5 without --save"),
        (["--threads", "0"], "threads: must be an integer >= 1, got 0"),
        (["--corpus", "/nonexistent"],
         "corpus: must be a text file or a directory of text files, got '/nonexistent'"),
    ],
)
def test_bad_options_are_refused_by_name(tmp_path, capsys, monkeypatch, argv, message):
    from nemo_lossfree.apps.cli import main
    from nemo_lossfree.apps.demo import launcher

    # Refused up front: no worker process may start (they would fail later, or train nonsense).
    monkeypatch.setattr(launcher, "launch", lambda *a, **k: pytest.fail("a worker was started"))
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    assert main(["demo", "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--out", "--save"])
def test_unwritable_out_or_save_is_one_line_naming_the_flag(tmp_path, capsys, monkeypatch, flag):
    from nemo_lossfree.apps.cli import main
    from nemo_lossfree.apps.demo import launcher

    monkeypatch.setattr(launcher, "launch", lambda *a, **k: pytest.fail("a worker was started"))
    (tmp_path / "a-file").write_text("")
    bad_dirs = [tmp_path / "a-file" / "x"] + ([Path("/proc/x")] if Path("/proc/self").exists() else [])
    for bad in bad_dirs:
        argv = ["--out", str(bad)] if flag == "--out" else ["--out", str(tmp_path / "out"), "--save", str(bad)]
        assert main(["demo", *argv]) == 2, bad
        err = capsys.readouterr().err
        assert err.splitlines() == [err.strip()] and err.startswith(
            f"nemo-lossfree demo: {flag}: cannot create or write {bad}"), err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--corpus", "/nonexistent"],
         "corpus: must be a text file or a directory of text files, got '/nonexistent'"),
        (["--save-interval", "0", "--save", "{tmp}/ckpt"], "save_interval: must be an integer >= 1, got 0"),
    ],
)
def test_worker_refuses_bad_flags_before_joining(tmp_path, argv, message):
    # torchrun/srun start the worker without the demo command: it must refuse
    # the same flags itself, with one line per rank and no traceback.
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    codes, errs = run_workers_to_exit(["--arm", "loss_free", "--out", str(tmp_path / "out"), "--steps", "1",
                                       *TINY, *argv])
    assert codes == [2, 2], errs
    for err in errs:
        assert err.strip() == f"nemo_lossfree.apps.demo.worker: {message}", err


def test_launcher_retries_when_its_port_is_taken(tmp_path, monkeypatch, capsys):
    # Another process holds the first port the launcher draws (two demos
    # started at once can draw the same one): rank 0 cannot listen, and the
    # launcher must start over on a fresh port instead of failing or hanging.
    import socket

    from nemo_lossfree.apps.demo import launcher
    from nemo_lossfree.testing.distributed import free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1], free_port()])
        monkeypatch.setattr(launcher, "free_port", lambda: next(ports))
        monkeypatch.setattr(launcher, "FAILED_PEER_GRACE_S", 2)  # rank 1 waits on the taken port
        code = launcher.launch(["--arm", "loss_free", "--steps", "1", "--out", str(tmp_path), *TINY],
                               tmp_path, quiet=True)
    assert code == 0
    assert "was taken before rank 0 could listen; retrying" in capsys.readouterr().err
    assert json.loads((tmp_path / "loss_free.json").read_text())["finished"]
