"""`nemo-lossfree validate-config` and the run-config loader behind it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nemo_lossfree import cli, layout_check
from nemo_lossfree.run_config import RunConfigError, load_run_config, parse_scalar

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"


def validate(capsys, *args):
    code = cli.main(["validate-config", str(TINY), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_valid_config_prints_a_summary_and_exits_0(capsys):
    code, out, err = validate(capsys)
    assert code == 0 and err == ""
    assert "valid" in out
    assert "TP 1 x PP 1 x CP 1 x DP 2" in out
    assert "EP 2 x ETP 1" in out and "4 per rank" in out
    assert "2 micro-batch(es) of 2" in out


def test_bad_update_rate_is_one_line_naming_the_key_and_exit_2(capsys):
    code, out, err = validate(capsys, "lossfree.update_rate=-1e-3")
    assert code == 2
    assert "lossfree.update_rate: must be a finite number >= 0, got -0.001" in err.splitlines()
    assert "Traceback" not in err + out


def test_command_line_process_has_no_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "nemo_lossfree.cli", "validate-config", str(TINY),
         "lossfree.update_rule=median", "model.expert_model_parallel_size=3"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith("lossfree.update_rule: must be one of quantile, sign, proportional") for line in lines)
    assert any(line.startswith("model.expert_model_parallel_size: must divide num_moe_experts (8)")
               for line in lines)


BAD_VARIANTS = [
    (["model.context_parallel_size=4"], "cluster: world size 2 (nodes 1 x tasks_per_node 2) is not divisible"),
    (["model.expert_model_parallel_size=3"], "model.expert_model_parallel_size:"),
    (["model.expert_model_parallel_size=4"], "model.expert_model_parallel_size: EP x ETP = 4 x 1 must divide"),
    (["train.global_batch_size=6"], "train.global_batch_size:"),
    (["model.sequence_parallel=true"], "model.sequence_parallel: requires tensor_model_parallel_size > 1"),
    (["model.tensor_model_parallel_size=2", "cluster.tasks_per_node=4"],
     "model.sequence_parallel: must be true with MoE"),
    (["model.virtual_pipeline_model_parallel_size=2"], "model.virtual_pipeline_model_parallel_size:"),
    (["model.moe_router_topk=9"], "model.moe_router_topk: must be <= num_moe_experts (8)"),
    (["model.moe_router_num_groups=3", "model.moe_router_group_topk=1"],
     "model.moe_router_num_groups: must divide num_moe_experts"),
    (["model.moe_router_group_topk=2"], "model.moe_router_num_groups: required"),
    (["model.moe_router_enable_expert_bias=true"],
     "model.moe_router_enable_expert_bias: must be false when lossfree.enabled is true"),
    (["lossfree.enabled=false", "model.moe_router_score_function=softmax",
      "model.moe_router_enable_expert_bias=true"],
     "model.moe_router_enable_expert_bias: Megatron-Core refuses expert bias"),
    (["lossfree.warmup_steps=-1"], "lossfree.warmup_steps:"),
    (["lossfree.rate=1e-3"], "lossfree.rate: unknown key"),
    (["cluster.gpus_per_node=4", "cluster.tasks_per_node=8"], "cluster.tasks_per_node: must be <= gpus_per_node"),
    (["model.num_moe_experts=null"], "model.num_moe_experts: lossfree.enabled needs an MoE model"),
]


@pytest.mark.parametrize("overrides,prefix", BAD_VARIANTS, ids=[p for _, p in BAD_VARIANTS])
def test_bad_variant_is_rejected_naming_the_key(capsys, overrides, prefix):
    code, out, err = validate(capsys, *overrides)
    assert code == 2, out
    assert any(line.startswith(prefix) for line in err.splitlines()), err


def test_aux_loss_next_to_lossfree_is_a_warning_not_an_error(capsys):
    code, out, err = validate(capsys, "model.moe_router_load_balancing_type=aux_loss",
                              "model.moe_aux_loss_coeff=0.01")
    assert code == 0
    assert err.startswith("warning: model.moe_aux_loss_coeff: is 0.01 with lossfree.enabled")


def test_overrides_are_typed_like_yaml_1_2():
    assert parse_scalar("1e-3") == 1e-3  # PyYAML alone would give the string "1e-3"
    assert parse_scalar("true") is True
    assert parse_scalar("null") is None
    assert parse_scalar("4") == 4
    assert parse_scalar("[0, 1, 1]") == [0, 1, 1]
    assert parse_scalar("sign") == "sign"
    config = load_run_config(TINY, ["lossfree.enabled=false", "model.num_layers=4",
                                    "optimizer.lr=3e-4", "+logger.log_interval=1"])
    assert config["lossfree"]["enabled"] is False
    assert config["model"]["num_layers"] == 4
    assert config["optimizer"]["lr"] == 3e-4
    assert config["logger"] == {"log_interval": 1}


def test_yaml_file_floats_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lossfree:\n  update_rate: 1e-3\n")
    assert load_run_config(path)["lossfree"]["update_rate"] == 1e-3


def test_unknown_section_in_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modle:\n  num_layers: 2\n")
    with pytest.raises(RunConfigError, match=r"^modle: unknown section"):
        load_run_config(path)


def test_override_through_a_scalar_is_an_error_naming_it():
    with pytest.raises(RunConfigError, match=r"^model.num_layers: is 2, not a section"):
        load_run_config(TINY, ["model.num_layers.x=1"])
    with pytest.raises(RunConfigError, match="section.key=value"):
        load_run_config(TINY, ["model.num_layers"])


def test_missing_file_exits_2_without_traceback(capsys, tmp_path):
    code = cli.main(["validate-config", str(tmp_path / "nope.yaml")])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith("no such file")


def test_cpu_cluster_needs_tasks_per_node(tmp_path):
    config = load_run_config(TINY)
    del config["cluster"]["tasks_per_node"]
    assert "cluster.tasks_per_node: required when gpus_per_node is 0 (CPU processes)" in (
        layout_check.find_problems(config))
