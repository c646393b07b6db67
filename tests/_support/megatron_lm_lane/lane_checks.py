"""examples/pretrain_gpt_lossfree.py end to end: Megatron-LM's own training loop on 2 CPU ranks.

``megatron.training.pretrain`` from the megatron-core wheel, Megatron's mock
GPT dataset, expert parallelism 2, through ``torchrun`` and
``nemo_lossfree.testing.megatron_lm_cpu`` (the CPU shims). Run 1 stops
after iteration 2 of 3 with a torch_dist checkpoint; run 2 resumes from it
and trains iteration 3. The balancer must log its ``lossfree/...`` metrics to
TensorBoard and resume its step (the rate schedule) and the biases.

Run by .ci/lanes/50-megatron-lm.sh (``make megatron-lm-test``)::

    python -m pytest -q tests/_support/megatron_lm_lane/lane_checks.py

Not collected by ``make test`` (the file name does not match test_*.py): four
Megatron-LM start-ups take 1.5-2 minutes of CPU. tests/test_megatron_lm_example.py
(in ``make test``) checks the example's command lines against Megatron's parser.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_lossfree.config import LossFreeConfig
from nemo_lossfree.update import scheduled_rate

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "pretrain_gpt_lossfree.py"
LAYERS, EXPERTS = 2, 4
# inverse_time with decay_steps=1 makes every step's rate different, and no
# centering makes each bias move by exactly +-rate (or 0): a restarted step
# or lost biases show in the numbers.
LOSSFREE = LossFreeConfig(update_rule="sign", update_rate=1e-2, schedule="inverse_time",
                          decay_steps=1, center=False)
LOSSFREE_FLAGS = ["--lossfree", "--lossfree-update-rule", "sign", "--lossfree-update-rate", "1e-2",
                  "--lossfree-schedule", "inverse_time", "--lossfree-decay-steps", "1",
                  "--no-lossfree-center"]
MODEL_FLAGS = [
    "--num-layers", str(LAYERS), "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--seq-length", "32", "--max-position-embeddings", "32",
    "--position-embedding-type", "rope", "--swiglu", "--disable-bias-linear",
    "--num-experts", str(EXPERTS), "--moe-ffn-hidden-size", "64", "--moe-router-topk", "2",
    "--moe-router-score-function", "sigmoid", "--moe-router-load-balancing-type", "none",
    "--moe-router-dtype", "fp32", "--expert-model-parallel-size", "2",
    "--moe-token-dispatcher-type", "allgather",
]
TRAIN_FLAGS = [
    "--train-iters", "3", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3",
    "--lr-decay-style", "constant", "--seed", "1234", "--mock-data",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
    "--eval-iters", "0", "--eval-interval", "1000", "--log-interval", "1",
    "--tensorboard-log-interval", "1", "--save-interval", "2",
]
# What the CPU needs: gloo, and Megatron-Core's local (non-fused) implementations.
CPU_FLAGS = [
    "--distributed-backend", "gloo", "--transformer-impl", "local", "--use-cpu-initialization",
    "--no-gradient-accumulation-fusion", "--no-persist-layer-norm", "--no-masked-softmax-fusion",
    "--no-bias-dropout-fusion", "--no-rope-fusion",
]


# The two launches use ~1m45s of CPU; on a shared, loaded machine the wall time is many times that.
LAUNCH_TIMEOUT_S = 1200
pytestmark = pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S + 60)


def launch(out: Path, name: str, *flags: str) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "nemo_lossfree.testing.megatron_lm_cpu", str(EXAMPLE),
        *MODEL_FLAGS, *TRAIN_FLAGS, *CPU_FLAGS, *LOSSFREE_FLAGS,
        "--tensorboard-dir", str(out / f"tb-{name}"), *flags,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    log = out / f"{name}.log"
    with open(log, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                cwd=out, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, f"{name} failed:\n" + log.read_text()[-6000:]


def scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def expert_biases(checkpoint: Path) -> torch.Tensor:
    """The routers' biases in a torch_dist checkpoint ([layers, experts], layers stacked)."""
    import torch.distributed.checkpoint as dcp

    state = {"decoder.layers.mlp.router.expert_bias": torch.empty(LAYERS, EXPERTS)}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return state["decoder.layers.mlp.router.expert_bias"]


def test_pretrain_logs_metrics_and_resumes_the_balancer(tmp_path):
    ckpt = tmp_path / "ckpt"
    # One run of 3 iterations, stopped after 2 (as a job out of time) and resumed.
    launch(tmp_path, "first", "--exit-interval", "2", "--save", str(ckpt))
    launch(tmp_path, "resumed", "--load", str(ckpt), "--save", str(ckpt))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb-first"))
    events.Reload()
    assert {"lossfree/maxvio_batch", "lossfree/maxvio_batch_layer_1", "lossfree/maxvio_batch_layer_2",
            "lossfree/bias_std", "lossfree/update_rate"} <= set(events.Tags()["scalars"])

    # The balancer's step: 0 and 1 in the first run, 2 after the resume.
    rates = scalars(tmp_path / "tb-first", "lossfree/update_rate")
    rates.update(scalars(tmp_path / "tb-resumed", "lossfree/update_rate"))
    assert sorted(rates) == [1, 2, 3]
    for iteration, rate in rates.items():
        assert rate == pytest.approx(scheduled_rate(LOSSFREE, iteration - 1), rel=1e-6)

    # The biases: saved at iteration 2, and iteration 3 moved each by one step of rate(2).
    saved = expert_biases(ckpt / "iter_0000002")
    assert saved.abs().sum() > 0
    moved = expert_biases(ckpt / "iter_0000003") - saved
    step = scheduled_rate(LOSSFREE, 2)
    assert torch.all((moved.abs() < 1e-7) | ((moved.abs() - step).abs() < 1e-7)), moved
    assert moved.abs().sum() > 0

