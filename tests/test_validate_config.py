"""`nemo-lossfree validate-config` and the run-config loader behind it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nemo_lossfree.apps import cli
from nemo_lossfree.runconfig.load import RunConfigError, load_run_config
from nemo_lossfree.runconfig.validate import find_problems

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
        [sys.executable, "-m", "nemo_lossfree.apps.cli", "validate-config", str(TINY),
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
    (["model.sequence_parallel=true"],
     'model: Megatron-Core\'s TransformerConfig refuses it: "Cannot use sequence parallelism without tensor '
     'parallelism"'),
    (["model.tensor_model_parallel_size=2", "cluster.tasks_per_node=4"],
     "model.sequence_parallel: must be true with MoE"),
    (["model.virtual_pipeline_model_parallel_size=2"], "model.virtual_pipeline_model_parallel_size:"),
    (["model.moe_router_topk=9"], "model.moe_router_topk: must be <= num_moe_experts (8)"),
    (["model.moe_router_num_groups=3", "model.moe_router_group_topk=1"],
     "model.num_moe_experts: num_moe_experts (8) should be divisible by moe_router_num_groups (3)."),
    (["model.moe_router_group_topk=2"],
     "model.moe_router_num_groups: When using group limited routing, moe_router_num_groups must be specified."),
    (["model.moe_router_enable_expert_bias=true"],
     "model.moe_router_enable_expert_bias: must be false (or None, 0) with lossfree.enabled, got True"),
    (["lossfree.enabled=false", "model.moe_router_score_function=softmax",
      "model.moe_router_enable_expert_bias=true"],
     "model.moe_router_score_function: Expert bias for aux-loss-free routing only supports 'sigmoid' and "
     "'sqrtsoftplus' score functions."),
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


# Megatron-Core's own model rules: TransformerConfig is built from the section and its
# refusal is the one line (with the summary line after it), naming the key.
MEGATRON_REFUSALS = [
    (["model.num_attention_heads=3", "model.num_query_groups=3", "model.tensor_model_parallel_size=2",
      "model.sequence_parallel=true", "cluster.tasks_per_node=4"],
     "model.num_attention_heads: num_attention_heads (3) must be a multiple of tensor_model_parallel_size (2)."),
    (["model.moe_router_num_groups=3", "model.moe_router_group_topk=1"],
     "model.num_moe_experts: num_moe_experts (8) should be divisible by moe_router_num_groups (3)."),
    (["model.moe_router_num_groups=4", "model.moe_router_group_topk=5"],
     "model.moe_router_group_topk: moe_router_group_topk (5) should be smaller than moe_router_num_groups (4)."),
    # Rules the hand-written checks never had (they passed these configs).
    (["model.moe_shared_expert_intermediate_size=0"],
     "model.moe_shared_expert_intermediate_size: moe_shared_expert_intermediate_size must be "
     "num_shared_experts * ffn_size_of_each_shared_expert, but got 0"),
    (["model.fp16=true", "model.bf16=true"],
     "model.fp16: Only one of self.fp16: True and self.bf16 True should be True."),
    (["model.recompute_granularity=partial"],
     'model: Megatron-Core\'s TransformerConfig refuses it: "When using recompute_granuarlity: partial must be '
     '"full"or "selective"."'),
]


@pytest.mark.parametrize("overrides,line", MEGATRON_REFUSALS, ids=[line.split(":")[0] + "-" + o[0]
                                                                     for o, line in MEGATRON_REFUSALS])
def test_megatron_model_rule_is_one_line_naming_the_key(capsys, overrides, line):
    code, out, err = validate(capsys, *overrides)
    assert code == 2, out
    assert err.splitlines() == [line, f"{TINY}: 1 problem(s)"]


def test_topk_above_the_expert_count_is_ours_megatron_finds_it_only_on_the_first_step(capsys):
    code, out, err = validate(capsys, "model.moe_router_topk=9")
    assert code == 2, out
    assert err.splitlines() == ["model.moe_router_topk: must be <= num_moe_experts (8), got 9",
                                f"{TINY}: 1 problem(s)"]


def test_query_groups_that_divide_tp_are_valid_as_megatron_says():
    """Megatron-Core takes query groups that are a multiple or a divisor of TP (KV heads replicated);
    the hand-written rule refused the divisors."""
    config = load_run_config(TINY, ["model.tensor_model_parallel_size=4", "model.sequence_parallel=true",
                                    "model.num_query_groups=2", "cluster.tasks_per_node=4",
                                    "train.global_batch_size=4"])
    assert find_problems(config) == []
    config["model"]["num_query_groups"] = 3
    assert find_problems(config) == [
        "model.num_query_groups: num_query_groups (3) must be a multiple or divisor of "
        "tensor_model_parallel_size (4)."]


def test_aux_loss_next_to_lossfree_is_a_warning_not_an_error(capsys):
    code, out, err = validate(capsys, "model.moe_router_load_balancing_type=aux_loss",
                              "model.moe_aux_loss_coeff=0.01")
    assert code == 0
    assert err.startswith("warning: model.moe_aux_loss_coeff: is 0.01 with lossfree.enabled")


def test_overrides_are_typed_like_yaml_1_2():
    config = load_run_config(TINY, ["lossfree.enabled=false", "model.num_layers=4",
                                    "optimizer.lr=3e-4", "+logger.log_interval=1", "model.moe_layer_freq=[0, 1]",
                                    "checkpoint.save=null", "model.moe_router_score_function=sigmoid"])
    assert config["lossfree"]["enabled"] is False
    assert config["model"]["num_layers"] == 4
    assert config["optimizer"]["lr"] == 3e-4  # PyYAML alone would give the string "3e-4"
    assert config["logger"] == {"log_interval": 1}
    assert config["model"]["moe_layer_freq"] == [0, 1]
    assert config["checkpoint"]["save"] is None
    assert config["model"]["moe_router_score_function"] == "sigmoid"


def test_typed_sections_are_typed_by_their_dataclass_and_keep_only_the_keys_given():
    """``lossfree`` is LossFreeConfig's schema, ``cluster`` ClusterSection's: OmegaConf converts or refuses."""
    config = load_run_config(None, ["lossfree.update_rate=0.5", "lossfree.center=off",
                                    "lossfree.integral_decay=0", "cluster.nodes=2"])
    assert config == {"lossfree": {"update_rate": 0.5, "center": False, "integral_decay": 0.0},
                      "cluster": {"nodes": 2}}
    assert type(config["lossfree"]["integral_decay"]) is float
    with pytest.raises(RunConfigError, match=r"^lossfree.update_rate: Value 'abc' of type 'str' could not be "
                                             r"converted to Float \(in override 'lossfree.update_rate=abc'\)$"):
        load_run_config(TINY, ["lossfree.update_rate=abc"])
    with pytest.raises(RunConfigError, match=r"^cluster.nodes: .*could not be converted to Integer"):
        load_run_config(TINY, ["cluster.nodes=1.5"])


def test_an_unknown_key_names_the_key_and_where_it_came_from(tmp_path):
    with pytest.raises(RunConfigError, match=r"^lossfree.rate: unknown key in override 'lossfree.rate=1'; "
                                             r"allowed keys are center, "):
        load_run_config(TINY, ["lossfree.rate=1"])
    path = tmp_path / "c.yaml"
    path.write_text("lossfree:\n  rate: 1\n")
    with pytest.raises(RunConfigError, match=rf"^lossfree.rate: unknown key in {path}; allowed keys are "):
        load_run_config(path)


def test_interpolation_is_resolved(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 64\n  ffn_hidden_size: ${model.hidden_size}\n")
    assert load_run_config(path)["model"]["ffn_hidden_size"] == 64
    path.write_text("model:\n  ffn_hidden_size: ${model.hiden_size}\n")
    with pytest.raises(RunConfigError, match=rf"^model.ffn_hidden_size: Interpolation key 'model.hiden_size' "
                                             rf"not found \(in {path}\)"):
        load_run_config(path)


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
        find_problems(config))


# ---- bad files: one line naming the file, exit 2, no traceback -----------------

def _cli_process(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nemo_lossfree.apps.cli", "validate-config", *argv],
                          capture_output=True, text=True, timeout=120)


def _bad_file(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A bad run-config input and a piece of the one line it must get."""
    path = tmp_path / "run.yaml"
    text = TINY.read_text()
    if kind == "directory":
        path.mkdir()
        return path, f"{path}: is a directory, not a YAML file"
    if kind == "not-utf-8":
        path.write_bytes(text.encode() + b"# caf\xe9\n")
        return path, f"{path}: not UTF-8 text (byte 0xe9 on line {text.count(chr(10)) + 1})"
    if kind == "syntax":
        path.write_text("model:\n  num_layers: 2\n  hidden: [64, 128\ntrain: {}\n")
        return path, f"{path}: line 4, column 6: not valid YAML: "
    if kind == "too-big":
        path.write_text(text + "#" * (1 << 20) + "\n")
        return path, f"{path}: must be at most 1 MiB (1048576 bytes) to be a run config, got "
    if kind == "two-lossfree-sections":
        path.write_text(text + "\nlossfree:\n  enabled: false\n")
        first = text.splitlines().index("lossfree:") + 1
        return path, (f"lossfree: duplicate key in {path} (lines {first} and "
                      f"{text.count(chr(10)) + 2}); YAML would keep only the last")
    if kind == "duplicate-nested-key":
        path.write_text(text.replace("  num_layers: 2\n", "  num_layers: 2\n  num_layers: 4\n"))
        first = text.splitlines().index("  num_layers: 2") + 1
        return path, (f"model.num_layers: duplicate key in {path} (lines {first} and {first + 1}); "
                      "YAML would keep only the last")
    if kind == "nested-too-deeply":
        path.write_text("model:\n  x: " + "[" * 50000 + "]" * 50000 + "\n")
        return path, f"{path}: not valid YAML for a run config: nested too deeply"
    raise AssertionError(kind)


BAD_FILES = ["directory", "not-utf-8", "syntax", "too-big", "two-lossfree-sections",
             "duplicate-nested-key", "nested-too-deeply"]


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_file_is_one_line_naming_it(tmp_path, kind):
    path, expected = _bad_file(tmp_path, kind)
    result = _cli_process(str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert result.stdout == ""


def test_yaml_syntax_error_names_the_line_not_a_unicode_string(tmp_path):
    path, _ = _bad_file(tmp_path, "syntax")
    with pytest.raises(RunConfigError) as info:
        load_run_config(path)
    message = str(info.value)
    assert "\n" not in message and "<unicode string>" not in message
    assert message.startswith(f"{path}: line 4, column 6: not valid YAML: ")
    assert "flow sequence" in message and "line 3" in message  # where the open bracket is


def test_oversized_file_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    from nemo_lossfree.runconfig import load

    path, _ = _bad_file(tmp_path, "too-big")

    def no_parse(*args, **kwargs):
        raise AssertionError("an oversized file was handed to the YAML parser")

    monkeypatch.setattr(load.OmegaConf, "create", no_parse)
    with pytest.raises(RunConfigError, match=r"must be at most 1 MiB"):
        load_run_config(path)


def test_merge_keys_may_override_what_they_merge(tmp_path):
    """``<<: *anchor`` then a key of the anchor is YAML's override, not a duplicate."""
    from nemo_lossfree.runconfig.load import read_yaml_file

    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {a: 1, b: 2}\nderived:\n  <<: *b\n  b: 3\n")
    assert read_yaml_file(path) == {"base": {"a": 1, "b": 2}, "derived": {"a": 1, "b": 3}}


# ---- unknown model keys ------------------------------------------------------------

def test_misspelt_model_key_in_an_override_is_refused_naming_it(capsys):
    code, out, err = validate(capsys, "model.moe_router_topkk=99")
    assert code == 2, out
    assert err.splitlines()[0] == (
        "model.moe_router_topkk: unknown key (not a field of Megatron-Core's TransformerConfig "
        "or MLATransformerConfig, nor of Megatron-Bridge's GPTModelProvider); did you mean "
        "moe_router_topk?")


def test_misspelt_model_key_in_the_file_is_refused_naming_it(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(TINY.read_text().replace("  moe_router_topk: 2\n", "  moe_router_topkk: 2\n"))
    code = cli.main(["validate-config", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines()[0].startswith("model.moe_router_topkk: unknown key"), err


def test_model_keys_are_megatrons_dataclass_fields_and_the_providers():
    import dataclasses

    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    from nemo_lossfree.runconfig.megatron_fields import PROVIDER_FIELDS, model_keys

    fields = {f.name for f in dataclasses.fields(MLATransformerConfig) if not f.name.startswith("_")}
    assert model_keys() == frozenset(fields) | PROVIDER_FIELDS
    assert {f.name for f in dataclasses.fields(TransformerConfig) if not f.name.startswith("_")} < fields
    assert {"seq_length", "vocab_size", "transformer_layer_spec"} <= PROVIDER_FIELDS


def test_megatron_refusal_is_the_only_output_of_the_process():
    """Importing and building Megatron-Core warns (Transformer Engine missing, no CUDA runtime,
    deprecated defaults): none of it may bury the one line."""
    result = _cli_process(str(TINY), "model.tensor_model_parallel_size=3", "model.sequence_parallel=true",
                          "cluster.tasks_per_node=3", "train.global_batch_size=6", "model.expert_model_parallel_size=1")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "model.num_attention_heads: num_attention_heads (4) must be a multiple of tensor_model_parallel_size (3).",
        f"{TINY}: 1 problem(s)",
    ]


def test_a_file_given_by_a_flag_is_named_with_the_flag(tmp_path):
    """One rule for every command that reads a run config from a flag (slurm, Bridge's entry point, the worker)."""
    with pytest.raises(RunConfigError, match=rf"^--config: {tmp_path / 'nope.yaml'}: no such file$"):
        load_run_config(tmp_path / "nope.yaml", flag="--config")
    with pytest.raises(RunConfigError, match=r"^lossfree.rate: unknown key"):  # a key names itself
        load_run_config(TINY, ["lossfree.rate=1"], flag="--config")
