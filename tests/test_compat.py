"""compat: one home, one wording for every refusal and warning about combinations.

The same rule used to be written in five places (router, balancer, the
Bridge flag, the Megatron-LM flags, the run-config check) with five wordings;
these tests hold every caller to the one in ``nemo_lossfree.compat``.
"""

from __future__ import annotations

import argparse
import logging
import types

import pytest

from nemo_lossfree import compat

TAIL = ("; the loss-free balancer owns the expert-bias update (Megatron-Core's finalize_model_grads "
        "would apply a second one): turn it off and configure the update through LossFreeConfig")


@pytest.mark.parametrize("value", [True, 1, "true", "false", ""])
def test_expert_bias_is_refused_unless_plainly_off(value):
    for config in ({"moe_router_enable_expert_bias": value},
                   types.SimpleNamespace(moe_router_enable_expert_bias=value)):
        with pytest.raises(ValueError) as info:
            compat.refuse_upstream_expert_bias(config, "X")
        expected = f"moe_router_enable_expert_bias: must be false (or None, 0) with X, got {value!r}"
        assert str(info.value) == expected + TAIL
    for off in (False, None, 0):
        compat.refuse_upstream_expert_bias({"moe_router_enable_expert_bias": off}, "X")
    compat.refuse_upstream_expert_bias({}, "X")


def test_the_key_is_spelt_the_callers_way():
    config = {"moe_router_enable_expert_bias": True}
    for spell, key in ((compat.field_name, "moe_router_enable_expert_bias"),
                       (compat.yaml_key, "model.moe_router_enable_expert_bias"),
                       (compat.flag, "--moe-router-enable-expert-bias")):
        with pytest.raises(ValueError, match=rf"^{key}: must be false"):
            compat.refuse_upstream_expert_bias(config, "X", spell)


def test_take_over_turns_the_flag_off_with_one_log_line(caplog):
    provider = types.SimpleNamespace(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-3)
    with caplog.at_level(logging.INFO, logger="nemo_lossfree"):
        assert compat.take_over_upstream_expert_bias(provider, 2e-3, compat.yaml_key) is True
        assert compat.take_over_upstream_expert_bias(provider, 2e-3, compat.yaml_key) is False
    assert provider.moe_router_enable_expert_bias is False
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [(
        "WARNING",
        "model.moe_router_enable_expert_bias: was True (Megatron-Core's expert-bias update, rate 0.001), "
        "set to false: LossFreeRouter takes it over: the bias buffer and its checkpoint key "
        "mlp.router.expert_bias stay, updated once per global batch by LossFreeBalancer at "
        "lossfree.update_rate 0.002",
    )]
    section = {"moe_router_enable_expert_bias": "false"}  # truthy for Megatron: on
    assert compat.take_over_upstream_expert_bias(section, 1e-3) is True
    assert section == {"moe_router_enable_expert_bias": False}
    for off in (False, None, 0):
        assert compat.take_over_upstream_expert_bias({"moe_router_enable_expert_bias": off}, 1e-3) is False


@pytest.mark.parametrize("types_", ["sinkhorn", ["seq_aux_loss", "quantile_balancing"]])
def test_balancing_that_does_not_pick_by_top_k_is_refused(types_):
    with pytest.raises(ValueError, match=r"^--moe-router-load-balancing-type: '(sinkhorn|quantile_balancing)' "
                                         r"selects experts without top-K on scores"):
        compat.refuse_unsupported_balancing({"moe_router_load_balancing_type": types_}, compat.flag)
    compat.refuse_unsupported_balancing({"moe_router_load_balancing_type": ["none", "seq_aux_loss"]})


def test_aux_loss_warning():
    assert compat.aux_loss_warning({"moe_aux_loss_coeff": 0.0}) is None
    assert compat.aux_loss_warning({}) is None
    on = compat.aux_loss_warning({"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 1e-2},
                                 compat.yaml_key)
    assert on.startswith("model.moe_aux_loss_coeff: is 0.01 with lossfree.enabled (load balancing type 'aux_loss')")
    idle = compat.aux_loss_warning({"moe_router_load_balancing_type": "none", "moe_aux_loss_coeff": 1e-2})
    assert "no effect while moe_router_load_balancing_type is none" in idle


# ---- every caller, one wording ------------------------------------------------------

def _refusal(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    return str(info.value)


def test_every_caller_refuses_megatrons_expert_bias_with_the_one_wording(pg_collection):
    from nemo_lossfree.balancer import LossFreeBalancer
    from nemo_lossfree.integrations.bridge import check_model_settings
    from nemo_lossfree.integrations.megatron_lm import normalize_args
    from nemo_lossfree.router import LossFreeRouter
    from nemo_lossfree.runconfig.load import load_run_config
    from nemo_lossfree.runconfig.validate import find_problems
    from nemo_lossfree.testing.models import moe_transformer_config

    config = moe_transformer_config(num_experts=4, expert_bias=True)
    model = [LossFreeRouter(moe_transformer_config(num_experts=4), pg_collection=pg_collection)]
    model[0].config.moe_router_enable_expert_bias = True
    args = argparse.Namespace(lossfree=True, moe_router_enable_expert_bias=True,
                              moe_router_load_balancing_type="none")
    run_config = load_run_config("configs/tiny-cpu.yaml", ["model.moe_router_enable_expert_bias=true"])
    lines = {
        "router": _refusal(lambda: LossFreeRouter(config, pg_collection=pg_collection)),
        "balancer": _refusal(lambda: LossFreeBalancer(model)),
        "megatron_lm": _refusal(lambda: normalize_args(args)),
        "run config": next(p for p in find_problems(run_config) if "expert_bias" in p),
    }
    for caller, line in lines.items():
        assert line.endswith("got True" + TAIL), (caller, line)
    # A Bridge recipe that sets it is taken over after these checks
    # (compat.take_over_upstream_expert_bias), not refused.
    check_model_settings(types.SimpleNamespace(num_moe_experts=8, moe_router_enable_expert_bias=True,
                                               moe_aux_loss_coeff=0.0))
    assert lines["run config"].startswith("model.moe_router_enable_expert_bias: must be false")
    assert lines["megatron_lm"].startswith("--moe-router-enable-expert-bias: must be false")


def test_every_caller_refuses_sinkhorn_with_the_one_wording(pg_collection):
    from nemo_lossfree.integrations.bridge import check_model_settings
    from nemo_lossfree.integrations.megatron_lm import normalize_args
    from nemo_lossfree.router import LossFreeRouter
    from nemo_lossfree.runconfig.load import load_run_config
    from nemo_lossfree.runconfig.validate import find_problems
    from nemo_lossfree.testing.models import moe_transformer_config

    reason = "'sinkhorn' selects experts without top-K on scores and cannot be combined with loss-free balancing"
    config = moe_transformer_config(num_experts=4, topk=1, load_balancing_type="sinkhorn")
    args = argparse.Namespace(lossfree=True, moe_router_load_balancing_type=["loss_free", "sinkhorn"])
    run_config = load_run_config("configs/tiny-cpu.yaml", ["model.moe_router_load_balancing_type=sinkhorn"])
    lines = [
        _refusal(lambda: LossFreeRouter(config, pg_collection=pg_collection)),
        _refusal(lambda: check_model_settings(types.SimpleNamespace(
            num_moe_experts=8, moe_router_load_balancing_type="sinkhorn"))),
        _refusal(lambda: normalize_args(args)),
        next(p for p in find_problems(run_config) if "sinkhorn" in p),
    ]
    assert [line.split(": ", 1)[1].split(";")[0] for line in lines] == [reason] * 4, lines
