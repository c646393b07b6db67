"""The demo's settings as a run config and back (what `nemo-lossfree demo` hands its workers)."""

from __future__ import annotations

import pytest

from nemo_lossfree.apps.demo.arms import ARMS
from nemo_lossfree.apps.demo.run_config import from_run_config, to_run_config
from nemo_lossfree.apps.demo.settings import DemoSettings
from nemo_lossfree.runconfig.load import load_run_config, save_run_config
from nemo_lossfree.runconfig.validate import check


@pytest.mark.parametrize("settings", [
    DemoSettings(),
    DemoSettings(steps=7, experts=4, topk=2, num_layers=2, dense_layers=1,
                 lr=1e-3, min_lr=0.0, lr_warmup_steps=2, lr_decay_steps=5, num_micro_batches=3, seed=11,
                 lossfree={"update_rule": "sign", "update_rate": 2e-3, "center": False}),
])
def test_the_written_run_config_validates_and_reads_back_as_the_same_settings(tmp_path, settings):
    path = tmp_path / "run_config.yaml"
    save_run_config(to_run_config(settings, world_size=2), path)
    config = load_run_config(path)
    problems, _warnings, _facts = check(config)
    assert problems == []
    assert from_run_config(config, list(ARMS)) == (settings, 2)


def test_demo_defaults_are_not_merged_into_the_lossfree_section():
    """The section a run config states is the LossFreeConfig that trains (no demo defaults added)."""
    config = load_run_config(None, ["lossfree.update_rate=0.01"])
    settings, _ = from_run_config(config, ["loss_free"])
    assert settings.lossfree == {"update_rate": 0.01}


@pytest.mark.parametrize("override, message", [
    ("model.context_parallel_size=2",
     "model.context_parallel_size: the CPU demo's model runs 1 (arm loss_free), got 2"),
    ("model.moe_token_dispatcher_type=alltoall", "model.moe_token_dispatcher_type: the CPU demo's model runs"),
    ("model.num_layers=2 model.moe_layer_freq=[1,0]", "model.moe_layer_freq: the CPU demo runs dense layers first"),
    ("model.moe_router_topk=1 model.moe_router_score_function=softmax",
     "model.moe_router_pre_softmax: Please use --moe-router-pre-softmax"),
    ("train.exit_interval=5", "train.exit_interval: not a setting of the CPU demo worker"),
    ("optimizer.bf16=true", "optimizer.bf16: the CPU demo runs False, got True"),
    ("train.global_batch_size=6", "train.global_batch_size: must be a multiple of train.micro_batch_size x ranks"),
])
def test_what_the_cpu_demo_cannot_run_is_refused_naming_the_key(override, message):
    config = load_run_config(None, override.split())
    with pytest.raises(ValueError) as info:
        from_run_config(config, ["loss_free"])
    assert str(info.value).startswith(message), str(info.value)
