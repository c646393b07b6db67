"""Reading the demo worker's progress lines back out of a job's log (the SLURM and NeMo-Run lanes do)."""

import json

from nemo_lossfree.apps.demo.protocol import PROGRESS_PREFIX, progress_events


def test_progress_events_are_read_in_order_behind_a_launchers_prefix():
    step = {"event": "step", "arm": "loss_free", "step": 3, "maxvio_batch": 0.25}
    log = "\n".join([
        "INFO building the model",
        PROGRESS_PREFIX + json.dumps({"event": "start", "step": 0, "resumed_from": None}),
        "0: " + PROGRESS_PREFIX + json.dumps(step),  # srun --label
        "a line that mentions @@lossfree-progress without an event",
        PROGRESS_PREFIX.strip(),
    ])
    assert progress_events(log) == [{"event": "start", "step": 0, "resumed_from": None}, step]


def test_a_log_without_progress_lines_has_no_events():
    assert progress_events("") == []
    assert progress_events("Traceback (most recent call last):\n  ...\nRuntimeError: boom\n") == []
