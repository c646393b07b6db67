"""Checkpoint and resume: stopped at step k and resumed, a run ends where an uninterrupted one does.

Two arms whose state is more than weights: ``loss_free`` (our router, the
balancer's step drives an inverse-time rate schedule) and ``megatron_bias``
(Megatron-Core's expert bias, updated in finalize_model_grads). One stop is
``--exit-after-steps``, the other a real SIGUSR1, each followed by ``--load``.
"""

from __future__ import annotations

import pytest
from test_demo_support import TINY, arm_json, run_workers, send_usr1

from nemo_lossfree.demo.worker import EXIT_STOPPED

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
