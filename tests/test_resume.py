"""Checkpoint and resume: stopped at step k and resumed, a run ends where an uninterrupted one does.

Two arms whose state is more than weights: ``loss_free`` (our router, the
balancer's step drives an inverse-time rate schedule) and ``megatron_bias``
(Megatron-Core's expert bias, updated in finalize_model_grads). One stop is
``--exit-after-steps``, the other a real SIGUSR1, each followed by ``--load``.
"""

from __future__ import annotations

import pytest

from nemo_lossfree.apps.demo.worker import EXIT_STOPPED

from _support.demo_workers import TINY, arm_json, run_workers, run_workers_to_exit, send_usr1

STEPS = 8
ARMS = "loss_free,megatron_bias"
# The schedule must not depend on how long one invocation runs.
COMMON = [*TINY, "--steps", str(STEPS), "--lr-decay-steps", str(STEPS), "--arm", ARMS,
          "--lossfree", "schedule=inverse_time", "--lossfree", "decay_steps=3",
          "--lossfree", "update_rate=0.05",
          # The drift integral is balancer state: the checkpoint must carry it too.
          "--lossfree", "integral_gain=0.2"]


# Four two-rank launches: ~1 minute on 2 idle cores, far more on a loaded machine.
@pytest.mark.timeout(1500)
def test_stop_and_resume_equals_uninterrupted(tmp_path):
    reference, resumed, ckpt = tmp_path / "reference", tmp_path / "resumed", tmp_path / "ckpt"
    assert run_workers([*COMMON, "--out", str(reference)])[:2] == (0, 0)

    # 1) loss_free stops after step 3 (as on a signal), saving a checkpoint.
    rc, _, _ = run_workers([*COMMON, "--out", str(resumed), "--save", str(ckpt),
                            "--exit-after-steps", "3"])
    assert rc == EXIT_STOPPED
    assert (ckpt / "loss_free" / "latest").read_text().strip() == "iter_0000003"
    assert arm_json(resumed, "loss_free")["finished"] is False

    # 2) resumed: loss_free continues from 3; megatron_bias gets SIGUSR1 as it starts.
    def usr1_when_megatron_bias_starts(event, procs):
        if event["event"] == "start" and event["arm"] == "megatron_bias":
            send_usr1(procs)

    rc, _, events = run_workers([*COMMON, "--out", str(resumed), "--load", str(ckpt),
                                 "--save", str(ckpt)], on_event=usr1_when_megatron_bias_starts)
    assert rc == EXIT_STOPPED
    starts = {e["arm"]: e for e in events if e["event"] == "start"}
    assert starts["loss_free"]["step"] == 3 and starts["loss_free"]["resumed_from"].endswith("iter_0000003")
    stopped_at = arm_json(resumed, "megatron_bias")["steps_done"]
    assert 1 <= stopped_at < STEPS

    # 3) resumed again: loss_free is skipped (finished), megatron_bias continues.
    rc, _, events = run_workers([*COMMON, "--out", str(resumed), "--load", str(ckpt)])
    assert rc == 0
    assert [e["arm"] for e in events if e["event"] == "start"] == ["megatron_bias"]
    assert events[0]["step"] == stopped_at

    for arm in ("loss_free", "megatron_bias"):
        want, got = arm_json(reference, arm), arm_json(resumed, arm)
        assert got["finished"] and got["steps_done"] == STEPS
        # Bit-identical: same biases, same per-step losses, same evaluation.
        assert got["final_bias"] == want["final_bias"], arm
        assert got["history"] == want["history"], arm
        assert got["val_loss"] == want["val_loss"], arm
        assert got["maxvio_global"] == want["maxvio_global"], arm
    # The balancer's step (which sets the scheduled rate) was restored, not restarted.
    assert arm_json(resumed, "loss_free")["balancer_state"]["steps_done"] == STEPS
    # The biases really moved (the equality above is not between zeros).
    assert any(abs(b) > 1e-3 for layer in want["final_bias"] for b in layer)


def _finished_arm(out, arm: str, argv: list[str]) -> None:
    """A finished ``<out>/<arm>.json`` as the worker records it, for the settings of ``argv``."""
    import json

    from nemo_lossfree.apps.demo.settings import settings_from_args
    from nemo_lossfree.apps.demo.worker import build_parser

    settings = settings_from_args(build_parser().parse_args(["--arm", arm, "--out", str(out), *argv]))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{arm}.json").write_text(json.dumps({"arm": arm, "finished": True, "steps_done": settings.steps,
                                                 "settings": settings.to_dict()}))


# (settings of the finished run, of the new run, the first setting that differs)
OTHER_SETTINGS = [
    (["--steps", "4"], ["--steps", "8"], "steps: recorded 4, got 8"),
    (["--steps", "4", "--lossfree", "update_rate=0.25"], ["--steps", "4"],
     "lossfree.update_rate: recorded 0.25, got unset"),
]


def _refused_by_the_command(tmp_path, capsys, monkeypatch, argv) -> str:
    from nemo_lossfree.apps.cli import main
    from nemo_lossfree.apps.demo import launcher

    monkeypatch.setattr(launcher, "launch", lambda *a, **k: pytest.fail("a worker was started"))
    assert main(["demo", "--quiet", "--arms", "loss_free", *TINY, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("recorded, new, difference", OTHER_SETTINGS)
def test_load_refuses_a_finished_arm_of_other_settings(tmp_path, capsys, monkeypatch, recorded, new, difference):
    # --load skips a finished arm; with other settings that would leave the old
    # numbers under the new run's settings.
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    ckpt.mkdir()
    _finished_arm(out, "loss_free", [*TINY, *recorded])
    err = _refused_by_the_command(tmp_path, capsys, monkeypatch,
                                  ["--out", str(out), "--load", str(ckpt), *new])
    assert f"{out / 'loss_free.json'} is a finished loss_free run with other settings ({difference})" in err


def test_load_refuses_a_missing_path(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "no_such_ckpt"
    err = _refused_by_the_command(tmp_path, capsys, monkeypatch,
                                  ["--out", str(tmp_path / "out"), "--load", str(missing)])
    assert f"load: must be an existing checkpoint directory (or the --save path), got '{missing}'" in err


def test_load_of_the_same_settings_or_of_the_save_path_still_runs(tmp_path, monkeypatch):
    # Today's behaviour stays: a finished arm of the same settings is skipped
    # (by the worker), and --load DIR --save DIR with no DIR yet is a first run
    # that resumes when requeued (the SLURM jobs' command line).
    from nemo_lossfree.apps.cli import main
    from nemo_lossfree.apps.demo import launcher

    started = []
    monkeypatch.setattr(launcher, "launch", lambda argv, *a, **k: started.append(argv) or 1)
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    _finished_arm(out, "loss_free", [*TINY, "--steps", "4", "--lossfree", "update_rate=0.25"])
    ckpt.mkdir()
    argv = ["demo", "--quiet", "--arms", "loss_free", *TINY, "--steps", "4", "--lossfree", "update_rate=0.25"]
    assert main([*argv, "--out", str(out), "--load", str(ckpt)]) == 1
    fresh = tmp_path / "fresh"
    assert main([*argv, "--out", str(out), "--load", str(fresh), "--save", str(fresh)]) == 1
    assert len(started) == 2


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", ["missing", "other_settings"])
def test_worker_refuses_the_same_loads(tmp_path, case):
    # torchrun/srun start the worker without the demo command: it must refuse
    # these itself, once per rank and without a traceback.
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    if case == "missing":
        message = f"load: must be an existing checkpoint directory (or the --save path), got '{ckpt}'"
    else:
        ckpt.mkdir()
        _finished_arm(out, "loss_free", [*TINY, "--steps", "2"])
        message = f"{out / 'loss_free.json'} is a finished loss_free run with other settings (steps: recorded 2, got 1)"
    codes, errs = run_workers_to_exit(["--arm", "loss_free", "--out", str(out), "--load", str(ckpt),
                                       *TINY, "--steps", "1"])
    assert codes == [2, 2], errs
    for err in errs:
        assert err.startswith("nemo_lossfree.apps.demo.worker: load: ") and message in err, err
        assert len(err.strip().splitlines()) == 1, err
