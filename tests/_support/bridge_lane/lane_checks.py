"""Megatron-Bridge lane: the ``lossfree`` flag with the real megatron-bridge 0.6.2.

Run only by .ci/lanes/30-bridge.sh, in the lane's venv, through the stand-in
runner (Transformer Engine / nvidia-resiliency-ext import stand-ins and
Bridge-on-CPU redirects, documented in this folder)::

    python tests/_support/bridge_lane/run_with_stand_ins.py -m pytest -q tests/_support/bridge_lane/lane_checks.py

Not collected by ``make test`` (the file name does not match test_*.py): the
project venv has no megatron-bridge.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "configs" / "tiny-cpu.yaml"
LOCAL_SPEC = "model.transformer_layer_spec=megatron.bridge.models.gpt_provider.local_layer_spec"
RECIPE = "vanilla_gpt_pretrain_config"


def _build(*overrides):
    from nemo_lossfree.integrations.bridge.pretrain import build_config
    from nemo_lossfree.runconfig.load import load_run_config

    merged = load_run_config(TINY, [LOCAL_SPEC, "model.expert_model_parallel_size=1", *overrides])
    return build_config(RECIPE, merged)


@pytest.fixture(scope="module")
def one_rank():
    from megatron.core import parallel_state

    from nemo_lossfree.testing import cpu
    from nemo_lossfree.testing.distributed import free_port

    if not parallel_state.model_parallel_is_initialized():
        cpu.init_distributed(0, 1, init_method=f"tcp://127.0.0.1:{free_port()}")
    yield


def _provide(provider):
    """Bridge's provide(), with the process groups its get_model would hand it."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    provider.finalize()
    provider._pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    return provider.provide()


def _routers(model):
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in model.modules() if isinstance(m, TopKRouter)]


def test_flag_turns_the_recipes_model_into_a_loss_free_model(one_rank):
    from megatron.bridge.models.gpt_provider import GPTModelProvider

    from nemo_lossfree.integrations.bridge import LossFreeLayerSpec, enable_lossfree
    from nemo_lossfree.router import LossFreeRouter

    config, lossfree = _build("lossfree.update_rate=2e-3")
    assert isinstance(config.model, GPTModelProvider)  # the recipe's provider, YAML applied
    assert config.model.num_moe_experts == 8 and config.model.num_layers == 2
    callback = enable_lossfree(config, lossfree)
    assert isinstance(config.model.transformer_layer_spec, LossFreeLayerSpec)
    assert callback.settings.update_rate == 2e-3
    model = _provide(config.model)  # Bridge's own provide(): spec callable -> GPTModel
    routers = _routers(model)
    assert len(routers) == 2 and all(type(r) is LossFreeRouter for r in routers)


def test_flag_off_leaves_megatrons_router(one_rank):
    from nemo_lossfree.integrations.bridge import enable_lossfree
    from nemo_lossfree.router import LossFreeRouter

    config, lossfree = _build("lossfree.enabled=false")
    assert enable_lossfree(config, lossfree) is None
    routers = _routers(_provide(config.model))
    assert len(routers) == 2 and not any(isinstance(r, LossFreeRouter) for r in routers)


def test_megatrons_expert_bias_next_to_the_flag_is_refused():
    from nemo_lossfree.integrations.bridge import enable_lossfree

    config, lossfree = _build("model.moe_router_enable_expert_bias=true")
    with pytest.raises(ValueError, match=r"^model.moe_router_enable_expert_bias: must be false"):
        enable_lossfree(config, lossfree)


def test_aux_loss_next_to_the_flag_warns():
    from nemo_lossfree.integrations.bridge import enable_lossfree

    config, lossfree = _build("model.moe_router_load_balancing_type=aux_loss",
                              "model.moe_aux_loss_coeff=0.01")
    with pytest.warns(UserWarning, match=r"model.moe_aux_loss_coeff: is 0.01 with lossfree.enabled"):
        enable_lossfree(config, lossfree)


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in tb_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_tiny_cpu_trains_through_bridges_pretrain_and_the_bias_moves(tmp_path):
    """2 CPU processes, EP 2, Bridge's own pretrain loop, 4 steps."""
    tb_dir = tmp_path / "tb"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(29000 + os.getpid() % 1000),
        str(ROOT / "tests" / "_support" / "bridge_lane" / "run_with_stand_ins.py"),
        "-m", "nemo_lossfree.integrations.bridge.pretrain", "--recipe", RECIPE,
        "--config-file", str(TINY), LOCAL_SPEC, f"logger.tensorboard_dir={tb_dir}",
        f"checkpoint.save={tmp_path / 'ckpt'}", "checkpoint.save_interval=1000",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "LossFreeBalancer attached to 2 router(s), starting at step 0" in log
    scalars = _scalars(tb_dir)
    # Bridge's own writer carries Bridge's metrics and ours.
    assert sorted(step for step, _ in scalars["lm loss"]) == [1, 2, 3, 4]
    steps = sorted(step for step, _ in scalars["lossfree/maxvio_batch"])
    assert steps == [1, 2, 3, 4]
    assert all(value == pytest.approx(1e-3) for _, value in scalars["lossfree/update_rate"])
    bias_std = dict(scalars["lossfree/bias_std"])
    # Sign updates of 1e-3 from zero: after step 1 every bias is +-1e-3 (or 0
    # for an expert at exactly the mean), and the spread grows or holds.
    assert 0 < bias_std[1] <= 1e-3 + 1e-9
    assert bias_std[4] > 0
    # Centered: the mean bias stays at 0.
    assert all(abs(value) < 1e-6 for _, value in scalars["lossfree/bias_mean"])
