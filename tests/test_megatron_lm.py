"""Megatron-LM integration: flags through the real parser, installation on a real model.

The parser is ``megatron.training.arguments.parse_args`` from the installed
megatron-core wheel (it reads ``sys.argv``). The installation check builds a
GPTModel through a pretrain_gpt.py-style model_provider in a fresh process
(Megatron's global args and parallel state are process-wide) and trains one
step with Megatron-Core's schedule and finalize_model_grads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_lossfree.config import LossFreeConfig

BASE_ARGV = ["pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "64",
             "--num-attention-heads", "4", "--num-experts", "8"]


def parse(monkeypatch, *extra, provider=True):
    from megatron.training.arguments import parse_args

    from nemo_lossfree.integrations.megatron_lm import add_lossfree_args

    monkeypatch.setattr(sys, "argv", BASE_ARGV + list(extra))
    return parse_args(extra_args_provider=add_lossfree_args if provider else None,
                      ignore_unknown_args=False)


def test_loss_free_balancing_type_is_rejected_without_the_provider(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parse(monkeypatch, "--moe-router-load-balancing-type", "loss_free", provider=False)
    assert "invalid choice: 'loss_free'" in capsys.readouterr().err


def test_loss_free_balancing_type_enables_and_maps_to_none(monkeypatch):
    from nemo_lossfree.integrations.megatron_lm import lossfree_config_from_args

    args = parse(monkeypatch, "--moe-router-load-balancing-type", "loss_free",
                 "--lossfree-update-rate", "2e-3", "--lossfree-update-rule", "proportional",
                 "--lossfree-schedule", "inverse_time", "--lossfree-decay-steps", "500",
                 "--no-lossfree-center", "--lossfree-freeze-after-steps", "9000")
    assert args.lossfree is True
    assert args.moe_router_load_balancing_type == ["none"]
    assert lossfree_config_from_args(args) == LossFreeConfig(
        update_rate=2e-3, update_rule="proportional", schedule="inverse_time",
        decay_steps=500, center=False, freeze_after_steps=9000,
    )


def test_loss_free_combines_with_a_sequence_aux_loss(monkeypatch):
    args = parse(monkeypatch, "--moe-router-load-balancing-type", "loss_free", "seq_aux_loss",
                 "--moe-aux-loss-coeff", "1e-4")
    assert args.lossfree is True
    assert args.moe_router_load_balancing_type == ["seq_aux_loss"]


def test_flags_default_to_lossfree_config_and_stay_off(monkeypatch):
    from nemo_lossfree.integrations.megatron_lm import is_enabled, lossfree_config_from_args

    args = parse(monkeypatch)
    assert args.lossfree is False and not is_enabled(args)
    assert args.moe_router_load_balancing_type == "aux_loss"  # Megatron's own default, untouched
    assert lossfree_config_from_args(args) == LossFreeConfig(enabled=False)
    assert parse(monkeypatch, "--lossfree").lossfree is True


def test_flags_are_generated_by_megatrons_argument_group_factory(monkeypatch, capsys):
    """One flag per LossFreeConfig field, typed, with its docstring as help (Megatron's conventions)."""
    import dataclasses

    from megatron.training.argument_utils import ArgumentGroupFactory

    from nemo_lossfree.integrations.megatron_lm import lossfree_argument_factory

    assert isinstance(lossfree_argument_factory(), ArgumentGroupFactory)
    args = parse(monkeypatch, "--lossfree", "--disable-lossfree-center", "--lossfree-integral-gain", "0.5",
                 "--lossfree-update-rule", "sign", "--lossfree-log-every", "3")
    assert (args.lossfree_center, args.lossfree_integral_gain, args.lossfree_log_every) == (False, 0.5, 3)
    # The documented --[no-]lossfree-center: both spellings, the default kept when neither is given.
    assert parse(monkeypatch, "--lossfree-center").lossfree_center is True
    assert parse(monkeypatch, "--no-lossfree-center").lossfree_center is False
    assert parse(monkeypatch, "--lossfree").lossfree_center is True
    for field in dataclasses.fields(LossFreeConfig):
        if field.name != "enabled":
            assert hasattr(args, "lossfree_" + field.name)
    with pytest.raises(SystemExit):
        parse(monkeypatch, "--lossfree-log-every", "three")
    assert "--lossfree-log-every: invalid int value: 'three'" in capsys.readouterr().err
    # (Megatron-LM 0.19.2's own --help fails on a '%' in one of its help texts: format ours alone.)
    import argparse

    from nemo_lossfree.integrations.megatron_lm import add_lossfree_args

    help_text = " ".join(add_lossfree_args(argparse.ArgumentParser()).format_help().split())
    assert "quantile (default): b += u * d, d the move that balances this global batch" in help_text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lossfree-update-rule", "cubic"], "--lossfree-update-rule: invalid choice: 'cubic'"),
        (["--lossfree", "--lossfree-update-rate", "-1"], "--lossfree-update-rate: must be a finite number >= 0"),
        (["--moe-router-load-balancing-type", "loss_free", "--moe-router-enable-expert-bias"],
         "--moe-router-enable-expert-bias: must be false"),
        (["--moe-router-load-balancing-type", "loss_free", "sinkhorn"],
         "--moe-router-load-balancing-type: 'sinkhorn' selects experts without top-K"),
    ],
)
def test_bad_values_are_errors_naming_the_flag(monkeypatch, capsys, extra, message):
    with pytest.raises(SystemExit):
        parse(monkeypatch, *extra)
    assert message in capsys.readouterr().err


def test_installation_on_a_real_model(tmp_path):
    """Spec rewrite, balancer attached in finalize_model_grads, TensorBoard metrics, resume step."""
    result = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["router_types"] == ["LossFreeRouter"] * 2
    assert report["steps_done"] == 8  # resumed at iteration 7, then one step
    assert report["rate_at_resume"] == pytest.approx(4e-3 / (1 + 7 / 10))
    assert report["bias_changed"] is True
    assert report["biases_mean_zero"] is True
    assert "lossfree/maxvio_batch" in report["tensorboard_tags"]
    assert "lossfree/maxvio_batch_layer_1" in report["tensorboard_tags"]
    assert report["tensorboard_steps"] == [8]
    # The load matrix at the first logging step: layer 1, then its counts / their mean (float16).
    assert report["load_matrix"][0][0] == 1.0
    assert report["load_matrix"][0][1:] == pytest.approx(report["relative_loads"][0], rel=1e-3)
    assert report["plain_router_types"] == ["TopKRouter"] * 2  # lossfree off: untouched


def _install_check(out: Path) -> None:
    """Runs in a fresh process: a pretrain_gpt.py-style provider, one training step."""
    from nemo_lossfree.testing import cpu

    cpu.enable()
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.training import global_vars
    from megatron.training.arguments import parse_args
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    from nemo_lossfree.integrations import megatron_lm
    from nemo_lossfree.testing.cpu import cuda_allocations_on_cpu
    from nemo_lossfree.testing.models import moe_transformer_config

    cpu.init_distributed(0, 1, init_method="tcp://127.0.0.1:0")
    sys.argv = BASE_ARGV + [
        "--moe-router-load-balancing-type", "loss_free", "--lossfree-update-rate", "4e-3",
        "--lossfree-schedule", "inverse_time", "--lossfree-decay-steps", "10",
        "--tensorboard-dir", str(out / "tb"), "--tensorboard-log-interval", "1",
    ]
    args = parse_args(extra_args_provider=megatron_lm.add_lossfree_args)
    global_vars.set_args(args)
    global_vars._set_tensorboard_writer(args)

    def model_provider(pre_process=True, post_process=True):
        # What pretrain_gpt.py does: the spec is built inside the provider.
        margs = global_vars.get_args()
        config = moe_transformer_config(num_layers=margs.num_layers, hidden_size=margs.hidden_size,
                                        num_attention_heads=margs.num_attention_heads,
                                        num_experts=margs.num_experts,
                                        load_balancing_type=margs.moe_router_load_balancing_type[0])
        spec = get_gpt_layer_local_spec(num_experts=margs.num_experts, moe_grouped_gemm=False)
        return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=256,
                        max_sequence_length=32, pre_process=pre_process, post_process=post_process)

    # What Megatron-LM's get_model() does: provider, then Megatron's DDP wrapper.
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    raw = megatron_lm.wrap_model_provider(model_provider)()
    model = DistributedDataParallel(config=raw.config, ddp_config=DistributedDataParallelConfig(),
                                    module=raw)
    routers = [m for m in model.modules() if type(m).__name__.endswith("Router")]
    before = [r.expert_bias.clone() for r in routers]
    # As after load_checkpoint of iteration 7 from a checkpoint without the
    # balancer state (Megatron-Core's own expert bias, or an older version's).
    stateless = {k: v for k, v in model.state_dict().items() if not k.endswith("router._extra_state")}
    assert len(stateless) < len(model.state_dict())
    model.load_state_dict(stateless)
    args.iteration = 7
    args.curr_iteration = 7
    tokens = torch.randint(0, 256, (4, 32))

    def forward_step(data_iterator, model):
        output = model(tokens, torch.arange(32).expand(4, -1), None, labels=tokens)
        return output, lambda out: (out.mean(), {"lm loss": out.mean().detach().clone()})

    with cuda_allocations_on_cpu():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None, None]), model=[model],
            num_microbatches=2, seq_length=32, micro_batch_size=4, forward_only=False,
        )
    state = megatron_lm.current()
    global_vars.get_tensorboard_writer().flush()
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]

    # The same provider with loss-free off builds Megatron's own router.
    megatron_lm.reset()
    args.lossfree = False
    plain = megatron_lm.wrap_model_provider(model_provider)()
    report = {
        "router_types": [type(r).__name__ for r in routers],
        "steps_done": state.balancer.steps_done,
        "rate_at_resume": state.balancer.last_metrics["lossfree/update_rate"],
        "bias_changed": any(not torch.equal(b, r.expert_bias) for b, r in zip(before, routers)),
        "biases_mean_zero": all(abs(r.expert_bias.mean().item()) < 1e-6 for r in routers),
        "tensorboard_tags": tags,
        "tensorboard_steps": [e.step for e in events.Scalars("lossfree/maxvio_batch")],
        "load_matrix": tensor_util.make_ndarray(events.Tensors("lossfree/loads")[0].tensor_proto)[:1].tolist(),
        "relative_loads": [(c / c.mean()).tolist() for c in state.balancer.last_loads[1][:1]],
        "plain_router_types": [type(m).__name__ for m in plain.modules()
                               if type(m).__name__.endswith("Router")],
    }
    (out / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    _install_check(Path(sys.argv[1]))


def test_a_saved_config_records_the_function_the_balancer_wraps(pg_collection):
    # Megatron-Bridge writes run_config.yaml through Megatron's ConfigContainer: the
    # balancer's closure was written by name and no loader could import it back.
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.training.config.container import ConfigContainerBase

    from nemo_lossfree import LossFreeBalancer

    from _support.routers import routers_with_expert_counts

    routers = routers_with_expert_counts(pg_collection, [8])
    config = routers[0].config
    LossFreeBalancer(routers).attach(config)
    assert config.finalize_model_grads_func is not finalize_model_grads
    assert ConfigContainerBase._convert_value_to_dict(config.finalize_model_grads_func) is finalize_model_grads
