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


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_model_section_builds_megatrons_transformer_config(path):
    """Megatron-Core accepts each section as it is (provider-only keys are Bridge's)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    from nemo_lossfree.runconfig.transformer_config import build, model_fields

    model = load_run_config(path)["model"]
    config = build(model_fields(model))
    expected = MLATransformerConfig if model.get("multi_latent_attention") else TransformerConfig
    assert type(config) is expected
    assert config.num_moe_experts == model["num_moe_experts"]
    assert config.expert_model_parallel_size == model["expert_model_parallel_size"]


def _tiny_with(changes: dict) -> dict:
    config = load_run_config(next(p for p in CONFIGS if p.name == "tiny-cpu.yaml"))
    config["model"].update(changes)
    config["lossfree"]["enabled"] = False  # let Megatron's own expert bias rule speak
    config["cluster"]["tasks_per_node"] = 16  # room for PP and TP
    config["train"]["global_batch_size"] = 64
    return config


# Rules that TransformerConfig itself enforces: the problem is its own message, on the key it names.
MEGATRON_RULES = [
    ({"num_layers": 7, "pipeline_model_parallel_size": 4, "num_layers_in_first_pipeline_stage": 1,
      "num_layers_in_last_pipeline_stage": 1}, "model"),
    ({"moe_router_num_groups": 3, "moe_router_group_topk": 1}, "model.num_moe_experts"),
    ({"moe_router_num_groups": 4, "moe_router_group_topk": 5}, "model.moe_router_group_topk"),
    ({"moe_router_score_function": "softmax", "moe_router_enable_expert_bias": True},
     "model.moe_router_score_function"),
    ({"tensor_model_parallel_size": 8, "sequence_parallel": True}, "model.num_attention_heads"),
]


@pytest.mark.parametrize("changes,key", MEGATRON_RULES, ids=[k for _, k in MEGATRON_RULES])
def test_megatron_rules_are_megatrons_own_message(changes, key):
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = _tiny_with(changes)
    fields = {k: v for k, v in config["model"].items() if k not in PROVIDER_ONLY}
    with pytest.raises((ValueError, AssertionError)) as info:
        TransformerConfig(**fields, params_dtype=torch.float32, pipeline_dtype=torch.float32)
    message = " ".join(str(info.value).split())
    problems = validate.find_problems(config)
    assert any(p.startswith(key + ":") and message in p for p in problems), (message, problems)


# Layout rules Megatron-Core applies only when it builds the model: ours, at config time.
OUR_LAYOUT_RULES = [
    ({"num_layers": 6, "pipeline_model_parallel_size": 4}, "model.pipeline_model_parallel_size"),
    ({"num_layers": 8, "pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 3},
     "model.virtual_pipeline_model_parallel_size"),
]


@pytest.mark.parametrize("changes,key", OUR_LAYOUT_RULES, ids=[k for _, k in OUR_LAYOUT_RULES])
def test_even_pipeline_split_is_ours_transformer_config_takes_it(changes, key):
    """If a Megatron-Core release refuses these in TransformerConfig, drop our copy of the rule."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = _tiny_with(changes)
    fields = {k: v for k, v in config["model"].items() if k not in PROVIDER_ONLY}
    TransformerConfig(**fields, params_dtype=torch.float32, pipeline_dtype=torch.float32)
    problems = validate.find_problems(config)
    assert [p for p in problems if p.startswith(key + ":")], problems


def test_each_problem_line_names_a_key():
    config = load_run_config(next(p for p in CONFIGS if p.name == "tiny-cpu.yaml"))
    config["model"].update(expert_model_parallel_size=3, sequence_parallel=True)
    config["lossfree"]["update_rate"] = -1
    for line in validate.find_problems(config):
        assert re.match(r"^(cluster|model|train|lossfree)(\.[a-z_]+)?: ", line), line
