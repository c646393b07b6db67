"""Nothing is lost on a crash: kill -9 mid-save, a corrupt newest checkpoint, SIGTERM.

A worker killed while it saves leaves no checkpoint that a resume would read
(the save is written into ``.iter_<n>.tmp`` and renamed when complete); a
checkpoint whose files no longer match its manifest is named in one line and
skipped; the resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_lossfree.apps.demo import checkpoint
from nemo_lossfree.apps.demo.worker import EXIT_STOPPED

from _support.demo_workers import TINY, arm_json, run_workers

STEPS = 7
COMMON = [*TINY, "--steps", str(STEPS), "--arm", "loss_free", "--lossfree", "update_rate=0.3"]
KILL_AT = 5

# Rank 1 of a worker that dies by SIGKILL right after its shards of step 5's
# checkpoint are written: mid-save for the checkpoint (no manifest, no rename).
KILLED_WORKER = f"""
import os, runpy, signal
from nemo_lossfree.testing import cpu
cpu.enable()
from megatron.core import dist_checkpointing
original = dist_checkpointing.save
def save(state, directory, *args, **kwargs):
    result = original(state, directory, *args, **kwargs)
    if os.environ["RANK"] == "1" and directory.endswith(".iter_{KILL_AT:07d}.tmp"):
        os.kill(os.getpid(), signal.SIGKILL)
    return result
dist_checkpointing.save = save
runpy.run_module("nemo_lossfree.apps.demo.worker", run_name="__main__")
"""


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, dead but not yet reaped, do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            return True
    return False


def _kill_group(pgid: int) -> None:
    """What a node that goes down does: every process of the worker's session dies, children too."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _run_until_rank1_is_killed(argv, timeout=600):
    from nemo_lossfree.testing.distributed import free_port

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    # Each rank in a session of its own: a rank's children (Megatron's async
    # checkpoint writer starts a multiprocessing Manager server) outlive a
    # SIGKILL of the rank itself, and would be left running after the test.
    procs = [subprocess.Popen([sys.executable, "-c", KILLED_WORKER, *argv], env=dict(env, RANK=str(r)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
             for r in range(2)]
    try:
        assert procs[1].wait(timeout=timeout) == -signal.SIGKILL, procs[1].stderr.read()[-3000:]
        _kill_group(procs[1].pid)  # the node that lost rank 1 loses its children too
        time.sleep(0.5)
        if procs[0].poll() is None:  # waiting for its dead peer: the node went down with it
            procs[0].kill()
        procs[0].wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            _kill_group(p.pid)
            p.stderr.close()
    deadline = time.monotonic() + 30
    while any(_group_alive(p.pid) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p.pid for p in procs if _group_alive(p.pid)]
    assert left == [], f"processes of the killed run's sessions {left} are still running"


@pytest.mark.timeout(1500)
def test_kill_9_mid_save_then_resume_equals_uninterrupted(tmp_path, capsys):
    reference, resumed, ckpt = tmp_path / "reference", tmp_path / "resumed", tmp_path / "ckpt"
    assert run_workers([*COMMON, "--out", str(reference)])[:2] == (0, 0)

    _run_until_rank1_is_killed([*COMMON, "--out", str(resumed), "--save", str(ckpt), "--save-interval", "1"])
    arm = ckpt / "loss_free"
    # The interrupted save is a .tmp directory that nothing names; latest is the previous step.
    assert (arm / f".iter_{KILL_AT:07d}.tmp").is_dir()
    assert not (arm / f"iter_{KILL_AT:07d}").exists()
    assert (arm / "latest").read_text().strip() == f"iter_{KILL_AT - 1:07d}"
    assert checkpoint.latest(str(ckpt), "loss_free") == arm / f"iter_{KILL_AT - 1:07d}"
    assert capsys.readouterr().err == ""

    # A truncated newest checkpoint: one line naming it, and the one before it is used.
    newest = arm / f"iter_{KILL_AT - 1:07d}"
    victim = max((p for p in newest.rglob("*") if p.is_file() and p.name != checkpoint.MANIFEST),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert checkpoint.latest(str(ckpt), "loss_free") == arm / f"iter_{KILL_AT - 2:07d}"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"checkpoint {newest}: {victim.relative_to(newest)} has ")
    assert err[0].endswith(f"resuming from {arm / f'iter_{KILL_AT - 2:07d}'}")

    rc, _, events = run_workers([*COMMON, "--out", str(resumed), "--load", str(ckpt), "--save", str(ckpt),
                                 "--save-interval", "1"])
    assert rc == 0
    assert events[0]["event"] == "start" and events[0]["step"] == KILL_AT - 2
    want, got = arm_json(reference, "loss_free"), arm_json(resumed, "loss_free")
    assert got["finished"] and got["steps_done"] == STEPS
    assert got["final_bias"] == want["final_bias"]
    assert got["history"] == want["history"]
    assert (got["val_loss"], got["maxvio_global"]) == (want["val_loss"], want["maxvio_global"])
    assert any(abs(b) > 1e-3 for layer in want["final_bias"] for b in layer)
    # Step 5 was saved again: complete, and its stale .tmp replaced.
    assert checkpoint.problem(arm / f"iter_{KILL_AT:07d}") is None
    assert checkpoint.problem(arm / f"iter_{STEPS:07d}") is None
    assert not (arm / f".iter_{KILL_AT:07d}.tmp").exists()


def test_no_intact_checkpoint_is_refused_with_the_path(tmp_path):
    arm = tmp_path / "loss_free"
    (arm / "iter_0000002").mkdir(parents=True)
    (arm / "iter_0000002" / "common.pt").write_bytes(b"x")
    (arm / "latest").write_text("iter_0000002\n")
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"checkpoint .*iter_0000002: no readable manifest.json \(not a finished save\); "
                             r"no intact checkpoint under .*loss_free"):
        checkpoint.latest(str(tmp_path), "loss_free")
    assert checkpoint.latest(str(tmp_path), "megatron_bias") is None  # never saved: a first run


@pytest.mark.timeout(900)
def test_sigterm_saves_and_exits_75(tmp_path):
    ckpt = tmp_path / "ckpt"

    def sigterm_at_step_2(event, procs):
        if event["event"] == "step" and event["step"] == 2:
            for p in procs:
                p.send_signal(signal.SIGTERM)

    rc0, rc1, events = run_workers([*COMMON, "--out", str(tmp_path / "out"), "--save", str(ckpt)],
                                   on_event=sigterm_at_step_2)
    assert (rc0, rc1) == (EXIT_STOPPED, EXIT_STOPPED) == (75, 75)
    stopped = arm_json(tmp_path / "out", "loss_free")["steps_done"]
    assert 2 <= stopped < STEPS
    assert checkpoint.latest(str(ckpt), "loss_free") == ckpt / "loss_free" / f"iter_{stopped:07d}"
    assert checkpoint.problem(ckpt / "loss_free" / f"iter_{stopped:07d}") is None
