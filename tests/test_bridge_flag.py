"""The Bridge flag's pieces that need only Megatron-Core (the real-Bridge checks
run in the Bridge lane: tests/_support/bridge_lane/lane_checks.py)."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

from nemo_lossfree.integrations.bridge import (
    LossFreeLayerSpec,
    check_model_settings,
    enable_lossfree,
    lossfree_config,
)
from nemo_lossfree.integrations.bridge import pretrain as bridge_pretrain
from nemo_lossfree.testing.models import moe_transformer_config

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")


def _local_spec(config):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False)


def test_wrapped_spec_builds_a_gpt_model_with_loss_free_routers(single_rank):
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.moe.router import TopKRouter

    from nemo_lossfree.router import LossFreeRouter

    config = moe_transformer_config(num_layers=2, num_experts=4)
    spec = LossFreeLayerSpec(_local_spec)(config)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=64,
                     max_sequence_length=16)
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    assert len(routers) == 2 and all(type(r) is LossFreeRouter for r in routers)


def test_wrapped_spec_passes_vp_stage_when_the_inner_callable_takes_it():
    from megatron.core.transformer.moe.moe_layer import MoESubmodules

    from nemo_lossfree.router import LossFreeRouter

    seen = {}

    def inner(config, vp_stage=None):
        seen["vp_stage"] = vp_stage
        return _local_spec(config)

    config = moe_transformer_config(num_experts=4)
    spec = LossFreeLayerSpec(inner)(config, vp_stage=3)
    assert seen == {"vp_stage": 3}
    mlp = spec.submodules.mlp
    submodules = mlp.keywords["submodules"] if isinstance(mlp, functools.partial) else mlp.submodules
    assert isinstance(submodules, MoESubmodules) and submodules.router is LossFreeRouter


def test_a_module_spec_is_wrapped_as_is():
    from nemo_lossfree.router import LossFreeRouter

    config = moe_transformer_config(num_experts=4)
    spec = LossFreeLayerSpec(_local_spec(config))(config)
    mlp = spec.submodules.mlp
    submodules = mlp.keywords["submodules"] if isinstance(mlp, functools.partial) else mlp.submodules
    assert submodules.router is LossFreeRouter


def test_a_pipeline_stage_of_dense_layers_is_built_as_is():
    """DeepSeek-V3's first pipeline stage holds only its 3 dense layers."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = moe_transformer_config(num_experts=4)
    dense_stage = get_gpt_layer_local_spec(num_experts=None)
    assert LossFreeLayerSpec(dense_stage)(config) is not None


def _holder(**model_fields):
    fields = dict(num_moe_experts=8, moe_router_enable_expert_bias=False, moe_aux_loss_coeff=0.0,
                  moe_router_load_balancing_type="none", transformer_layer_spec=_local_spec)
    fields.update(model_fields)
    return types.SimpleNamespace(model=types.SimpleNamespace(**fields))


def test_flag_off_or_absent_changes_nothing():
    holder = _holder()
    assert enable_lossfree(holder, {"enabled": False}) is None
    assert enable_lossfree(holder, None) is None
    assert holder.model.transformer_layer_spec is _local_spec


def test_take_over_waits_for_the_dense_model_refusal():
    holder = _holder(num_moe_experts=None, moe_router_enable_expert_bias=True)
    with pytest.raises(ValueError, match=r"^model.num_moe_experts:"):
        enable_lossfree(holder, {"enabled": True})
    assert holder.model.moe_router_enable_expert_bias is True  # untouched


def test_flag_off_leaves_a_recipes_expert_bias_alone():
    holder = _holder(moe_router_enable_expert_bias=True)
    assert enable_lossfree(holder, {"enabled": False}) is None
    assert holder.model.moe_router_enable_expert_bias is True


def test_dense_model_is_refused():
    with pytest.raises(ValueError, match=r"^model.num_moe_experts:"):
        check_model_settings(_holder(num_moe_experts=None).model)


def test_aux_loss_left_on_warns():
    model = _holder(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2).model
    with pytest.warns(UserWarning, match=r"^model.moe_aux_loss_coeff: is 0.01 with lossfree.enabled"):
        check_model_settings(model)


def test_section_values_are_validated_with_loss_free_configs_messages():
    assert lossfree_config({"enabled": True, "update_rate": 1e-3}).update_rate == 1e-3
    with pytest.raises(ValueError, match=r"^lossfree.update_rate: must be a finite number >= 0"):
        lossfree_config({"enabled": True, "update_rate": -1e-3})


def test_entry_point_rejects_a_bad_flag_before_importing_bridge(capsys):
    code = bridge_pretrain.main(["--recipe", "vanilla_gpt_pretrain_config", "--config-file",
                                 TINY, "lossfree.update_rate=-1e-3"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: lossfree.update_rate: must be a finite number >= 0, got -0.001")
    code = bridge_pretrain.main(["--recipe", "x", "--config-file", TINY, "lossfre.enabled=true"])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: lossfre: unknown section")


def test_import_object_accepts_both_spellings():
    assert bridge_pretrain.import_object("os.path:join") is bridge_pretrain.os.path.join
    assert bridge_pretrain.import_object("os.path.join") is bridge_pretrain.os.path.join


MISSING_BRIDGE = ("error: megatron.bridge: not installed; this entry point needs Megatron-Bridge 0.6: "
                  "pip install 'nemo-lossfree[bridge]' (megatron-bridge>=0.6,<0.7")


def test_entry_point_without_bridge_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.bridge", None)  # as if not installed
    code = bridge_pretrain.main(["--recipe", "vanilla_gpt_pretrain_config", "--config-file", TINY])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(MISSING_BRIDGE), err


@pytest.mark.skipif(importlib.util.find_spec("megatron.bridge") is not None,
                    reason="Megatron-Bridge is installed here")
def test_entry_point_process_without_bridge_is_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "nemo_lossfree.integrations.bridge.pretrain", "--recipe", "vanilla_gpt_pretrain_config",
         "--config-file", TINY], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(MISSING_BRIDGE), result.stderr


def test_entry_point_names_the_flag_for_a_bad_config_file(capsys, tmp_path):
    code = bridge_pretrain.main(["--recipe", "x", "--config-file", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err == f"error: --config-file: {tmp_path}: is a directory, not a YAML file\n"
