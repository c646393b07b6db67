"""Every YAML in configs/ is valid, states its GPU count, and speaks Megatron's field names."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from nemo_lossfree.runconfig import validate
from nemo_lossfree.runconfig.load import load_run_config, tasks_per_node

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
# GPTModelProvider (Megatron-Bridge) fields that are not TransformerConfig fields.
PROVIDER_ONLY = {"seq_length", "vocab_size"}


def test_the_promised_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny-cpu.yaml", "paper-1b.yaml", "paper-3b.yaml", "deepseek-v3-1024gpu.yaml",
            "qwen3-30b-a3b.yaml", "gpt-oss-120b-softmax.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid_and_states_its_gpu_count(path):
    config = load_run_config(path)
    problems, _, facts = validate.check(config)
    assert problems == []
    # The header comment names the layout, and the cluster section agrees with it.
    header = path.read_text().split("\ncluster:")[0]
    assert "Laid out for" in header or "laid out for" in header
    cluster = config["cluster"]
    world = cluster["nodes"] * tasks_per_node(cluster)
    assert facts["world"] == world
    assert str(world) in header
    assert config["lossfree"]["enabled"] is True


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_model_keys_are_megatron_field_names(path):
    """A misspelt key would be skipped with a warning by Bridge; catch it here."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    fields = {f.name for f in dataclasses.fields(MLATransformerConfig)} | PROVIDER_ONLY
    unknown = set(load_run_config(path)["model"]) - fields
    assert unknown == set()


@pytest.mark.parametrize("name", ["paper-1b.yaml", "paper-3b.yaml"])
def test_paper_configs_follow_the_paper(name):
    config = load_run_config(next(p for p in CONFIGS if p.name == name))
    model = config["model"]
    assert model["num_moe_experts"] == 64
    assert model["moe_router_topk"] == 6
    assert model["moe_router_score_function"] == "sigmoid"
    # 2 shared experts of the routed experts' width.
    assert model["moe_shared_expert_intermediate_size"] == 2 * model["moe_ffn_hidden_size"]
    assert model["moe_aux_loss_coeff"] == 0.0
    assert config["lossfree"]["update_rate"] == 1e-3


def test_deepseek_v3_config_is_for_about_1024_gpus_with_expert_parallelism():
    config = load_run_config(next(p for p in CONFIGS if p.name == "deepseek-v3-1024gpu.yaml"))
    _, _, facts = validate.check(config)
    assert facts["world"] == 1024 and config["cluster"]["gpus_per_node"] == 8
    assert facts["ep"] > 1 and facts["experts"] // facts["ep"] == 4


@pytest.mark.parametrize("name", ["qwen3-30b-a3b.yaml", "gpt-oss-120b-softmax.yaml"])
def test_softmax_configs_use_our_bias_not_megatrons(name):
    model = load_run_config(next(p for p in CONFIGS if p.name == name))["model"]
    assert model["moe_router_score_function"] == "softmax"
    assert model["moe_router_enable_expert_bias"] is False


def test_tiny_cpu_model_section_builds_a_real_transformer_config():
    """Megatron-Core accepts the section as it is (after dropping provider-only keys)."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    model = load_run_config(next(p for p in CONFIGS if p.name == "tiny-cpu.yaml"))["model"]
    fields = {k: v for k, v in model.items() if k not in PROVIDER_ONLY}
    config = TransformerConfig(**fields, params_dtype=torch.float32, use_cpu_initialization=True)
    assert config.num_moe_experts == 8 and config.expert_model_parallel_size == 2


# Rules that TransformerConfig itself enforces: ours must flag the same inputs.
MEGATRON_RULES = [
    ({"num_layers": 6, "pipeline_model_parallel_size": 4}, "model.pipeline_model_parallel_size"),
    ({"num_layers": 8, "pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 3},
     "model.virtual_pipeline_model_parallel_size"),
    ({"moe_router_num_groups": 3, "moe_router_group_topk": 1}, "model.moe_router_num_groups"),
    ({"moe_router_num_groups": 4, "moe_router_group_topk": 5}, "model.moe_router_group_topk"),
    ({"moe_router_score_function": "softmax", "moe_router_enable_expert_bias": True},
     "model.moe_router_enable_expert_bias"),
]


@pytest.mark.parametrize("changes,key", MEGATRON_RULES, ids=[k for _, k in MEGATRON_RULES])
def test_layout_rules_agree_with_megatron_transformer_config(changes, key):
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = load_run_config(next(p for p in CONFIGS if p.name == "tiny-cpu.yaml"))
    config["model"].update(changes)
    config["lossfree"]["enabled"] = False  # let Megatron's own expert bias rule speak
    config["cluster"]["tasks_per_node"] = 16  # room for PP
    config["train"]["global_batch_size"] = 64
    problems = validate.find_problems(config)
    assert any(p.startswith(key + ":") for p in problems), problems
    fields = {k: v for k, v in config["model"].items() if k not in {"seq_length", "vocab_size"}}
    with pytest.raises((ValueError, AssertionError)):
        TransformerConfig(**fields, params_dtype=torch.float32, use_cpu_initialization=True)


def test_each_problem_line_names_a_key():
    config = load_run_config(next(p for p in CONFIGS if p.name == "tiny-cpu.yaml"))
    config["model"].update(expert_model_parallel_size=3, sequence_parallel=True)
    config["lossfree"]["update_rate"] = -1
    for line in validate.find_problems(config):
        assert re.match(r"^(cluster|model|train|lossfree)(\.[a-z_]+)?: ", line), line
