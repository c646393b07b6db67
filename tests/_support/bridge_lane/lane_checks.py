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


def test_megatrons_expert_bias_next_to_the_flag_is_taken_over(one_rank, caplog):
    from nemo_lossfree.integrations.bridge import enable_lossfree
    from nemo_lossfree.router import LossFreeRouter

    config, lossfree = _build("model.moe_router_enable_expert_bias=true")
    with caplog.at_level("WARNING", logger="nemo_lossfree.compat"):
        assert enable_lossfree(config, lossfree) is not None
    assert [r.message for r in caplog.records if "takes it over" in r.message] != []
    assert config.model.moe_router_enable_expert_bias is False
    routers = _routers(_provide(config.model))
    assert all(type(r) is LossFreeRouter for r in routers)
    # The buffer (and so the checkpoint key) is Megatron's own name.
    assert all(r.expert_bias is not None for r in routers)


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


# A rate that changes every step and the drift integral on: what a resume
# must bring back besides the bias (the step counter and the integral).
SCHEDULED = {"lossfree.schedule": "inverse_time", "lossfree.decay_steps": 2, "lossfree.integral_gain": 0.5}


def _pretrain(workdir: Path, *overrides: str) -> str:
    """configs/tiny-cpu.yaml through Bridge's own pretrain(), 2 CPU processes (EP 2); the log."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(29000 + (os.getpid() + len(workdir.name)) % 1000),
        str(ROOT / "tests" / "_support" / "bridge_lane" / "run_with_stand_ins.py"),
        "-m", "nemo_lossfree.integrations.bridge.pretrain", "--recipe", RECIPE,
        "--config-file", str(TINY), LOCAL_SPEC, f"logger.tensorboard_dir={workdir / 'tb'}",
        *(f"{key}={value}" for key, value in SCHEDULED.items()), *overrides,
    ]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=1200)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    return log


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> tuple[Path, str]:
    """The uninterrupted run: 4 steps, Bridge's checkpointing saving at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("four_steps")
    log = _pretrain(workdir, f"checkpoint.save={workdir / 'ckpt'}", "checkpoint.save_interval=2")
    return workdir, log


def test_tiny_cpu_trains_through_bridges_pretrain_and_the_bias_moves(four_steps):
    """2 CPU processes, EP 2, Bridge's own pretrain loop, 4 steps."""
    from nemo_lossfree.config import LossFreeConfig
    from nemo_lossfree.update import scheduled_rate

    workdir, log = four_steps
    assert "LossFreeBalancer attached to 2 router(s), starting at step 0" in log
    scalars = _scalars(workdir / "tb")
    # Bridge's own writer carries Bridge's metrics and ours.
    assert sorted(step for step, _ in scalars["lm loss"]) == [1, 2, 3, 4]
    steps = sorted(step for step, _ in scalars["lossfree/maxvio_batch"])
    assert steps == [1, 2, 3, 4]
    settings = LossFreeConfig(update_rate=1e-3, schedule="inverse_time", decay_steps=2, integral_gain=0.5)
    rates = {step: scheduled_rate(settings, step - 1) for step in steps}
    assert len(set(rates.values())) == 4  # the schedule moves every step
    assert dict(scalars["lossfree/update_rate"]) == pytest.approx(rates)
    bias_std = dict(scalars["lossfree/bias_std"])
    # Sign updates from zero: after step 1 every bias moved by the rate plus
    # the integral's first term (gain x the same move), or not at all for an
    # expert at exactly the mean; the spread grows or holds.
    assert 0 < bias_std[1] <= rates[1] * (1 + settings.integral_gain) + 1e-9
    assert bias_std[4] > 0
    # Centered: the mean bias stays at 0.
    assert all(abs(value) < 1e-6 for _, value in scalars["lossfree/bias_mean"])


def test_the_runs_checkpoint_loads_through_the_export_command(four_steps, tmp_path):
    """`nemo-lossfree export` on the checkpoint Bridge's pretrain() saved (newest: step 4).

    The run_config.yaml Bridge wrote (LossFreeLayerSpec with the spec it wrapped,
    the balancer's finalize_model_grads wrapper) loads with no --layer-spec, the
    EP=2 layout collapsed to one CPU process. A vanilla GPT has no Hugging Face
    family with an expert-bias slot: after loading, the export is refused in one
    line and nothing is written.
    """
    workdir, _ = four_steps
    # Bridge's run config records Megatron's finalize_model_grads, not the balancer's
    # wrapper (a closure no loader can import; the balancer re-attaches at each start).
    saved = sorted((workdir / "ckpt").glob("iter_*/run_config.yaml"))
    assert saved and all(
        "megatron.core.distributed.finalize_model_grads.finalize_model_grads" in p.read_text()
        and "attach.<locals>" not in p.read_text() for p in saved), saved
    out = tmp_path / "hf"
    export = [
        sys.executable, str(ROOT / "tests" / "_support" / "bridge_lane" / "run_with_stand_ins.py"),
        "-m", "nemo_lossfree.apps.cli", "export", str(workdir / "ckpt"),
        "--hf-model", str(ROOT / "tests" / "_support" / "bridge_lane" / "hf_configs" / "Qwen--Qwen3-30B-A3B"),
        "--hf-path", str(out),
    ]
    result = subprocess.run(export, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, (result.stdout + result.stderr)[-6000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "nemo-lossfree export: Qwen3MoeForCausalLM has no expert-bias slot in Hugging Face transformers")
    assert not out.exists()


def _checkpoint(directory: Path) -> dict:
    """A Bridge checkpoint (torch_dist format) read back whole, on one process, by torch's own reader."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(directory, Path(tmp) / "whole.pt")
        return torch.load(Path(tmp) / "whole.pt", weights_only=False)


def _identical(a, b) -> bool:
    """Bit for bit: tensors (dtype, shape, values), arrays, and containers of them."""
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_bridges_own_checkpoint_resumes_the_balancer_bit_for_bit(four_steps, tmp_path):
    """Resume at step 2 through Bridge's checkpoint load; steps 3-4 end where the uninterrupted run did.

    A new process is given only Bridge's checkpoint config (``checkpoint.load``
    and ``ckpt_step``, Bridge's own way to pick a saved iteration): the
    routers' ``_extra_state`` in that checkpoint is the only copy of the step
    counter and the drift integral (no side file). The uninterrupted run's
    step-2 checkpoint is the one a run stopped at step 2 would leave: Bridge
    writes it synchronously and never touches it again.
    """
    import torch

    first, _ = four_steps
    log = _pretrain(tmp_path, f"checkpoint.load={first / 'ckpt'}", "checkpoint.ckpt_step=2",
                    f"checkpoint.save={tmp_path / 'ckpt'}", "checkpoint.save_interval=2")
    assert "loaded checkpoint from" in log and "at iteration 2" in log
    assert "LossFreeBalancer attached to 2 router(s), starting at step 2" in log
    assert "holds no balancer state" not in log  # not the iteration fallback

    saved = _checkpoint(first / "ckpt" / "iter_0000002")
    uninterrupted = _checkpoint(first / "ckpt" / "iter_0000004")
    resumed = _checkpoint(tmp_path / "ckpt" / "iter_0000004")
    router_keys = sorted(k for k in uninterrupted if ".router.expert_bias" in k or ".router._extra_state" in k)
    assert len(router_keys) == 3  # the 2 layers' biases (stacked) and each layer's _extra_state
    for key in router_keys:
        if "_extra_state" in key:
            (state_at_2,), (state_at_4,) = saved[key], uninterrupted[key]
            # What the resume had to restore: mid-schedule, a live integral.
            assert state_at_2["steps"].tolist() == [2] and state_at_2["integral"].abs().max() > 0
            assert state_at_4["steps"].tolist() == [4]
        assert _identical(resumed[key], uninterrupted[key]), key

    # Everything else Bridge saved agrees too (weights, optimizer, schedule,
    # Python / NumPy / model-parallel RNG), except the CPU generator, which
    # is one int64 draw ahead: torch's DataLoader iterator draws its base seed
    # (``_BaseDataLoaderIter._base_seed``) from it when Bridge builds the data
    # iterators, and the resumed process builds them after restoring the
    # step-2 RNG state, the uninterrupted one before step 1. Nothing in this
    # run draws from that generator otherwise (no dropout, no loader workers).
    assert uninterrupted.keys() == resumed.keys()
    differ = sorted(k for k in uninterrupted if not _identical(resumed[k], uninterrupted[k]))
    assert differ == sorted(k for k in uninterrupted if k.startswith("rng_state/")), differ
    for key in differ:
        (ranks_mine,), (ranks_theirs,) = uninterrupted[key], resumed[key]
        for mine, theirs in zip(ranks_mine, ranks_theirs):
            generator = torch.Generator()
            generator.set_state(mine.pop("torch_rng_state"))
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            assert torch.equal(theirs.pop("torch_rng_state"), generator.get_state()), key
            assert _identical(mine, theirs), key

    # The same losses and metrics at steps 3 and 4, to the bit.
    before, after = _scalars(first / "tb"), _scalars(tmp_path / "tb")
    assert sorted(step for step, _ in after["lm loss"]) == [3, 4]
    for tag in ("lm loss", "lossfree/maxvio_batch", "lossfree/update_rate", "lossfree/bias_std"):
        assert sorted(after[tag]) == sorted((s, v) for s, v in before[tag] if s > 2), tag


# --- every configs/*.yaml on the real recipe it names ----------------------

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _named_recipe(path: Path) -> str:
    """The recipe a config's own comment tells users to run it with."""
    import re

    found = set(re.findall(r"--recipe (\S+)", path.read_text()))
    assert len(found) == 1, f"{path.name}: names {sorted(found) or 'no'} --recipe"
    return found.pop()


def _spec_modules(node) -> list:
    """Every module class in a (block or layer) ModuleSpec tree."""
    import dataclasses
    import functools

    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(node, ModuleSpec):
        return [node.module, *_spec_modules(node.submodules), *_spec_modules(node.params or {})]
    if isinstance(node, functools.partial):
        return [m for x in (node.func, *node.args, *node.keywords.values()) for m in _spec_modules(x)]
    if isinstance(node, (list, tuple)):
        return [m for x in node for m in _spec_modules(x)]
    if isinstance(node, dict):
        return [m for x in node.values() for m in _spec_modules(x)]
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return [m for f in dataclasses.fields(node) for m in _spec_modules(getattr(node, f.name))]
    if isinstance(node, type):
        return [node]
    return []


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_merges_onto_its_real_recipe(path, one_rank, monkeypatch):
    """Recipe -> YAML -> flag -> Bridge's validate() -> LossFreeRouter in the spec.

    Bridge's validate() finalizes the provider (its TransformerConfig is
    constructed here, on the CPU) and checks the layout against the world
    size, which is the config's cluster: nodes x gpus_per_node.
    Transformer Engine is absent here, so a recipe whose spec is TE's is
    given Bridge's local equivalent (the swap configs/tiny-cpu.yaml documents),
    and what needs Transformer Engine kernels or a GPU is switched off: the
    precision-aware optimizer (TE's FusedAdam), fused MoE permutation and
    RoPE (TE kernels), and the flex token dispatcher (DeepEP / HybridEP,
    validated against the GPU's architecture) becomes alltoall.
    """
    import megatron.bridge.training.config as bridge_config
    import torch
    from megatron.bridge.models import gpt_provider

    from nemo_lossfree.integrations.bridge import enable_lossfree
    from nemo_lossfree.integrations.bridge.pretrain import build_config
    from nemo_lossfree.router import LossFreeRouter
    from nemo_lossfree.runconfig.load import load_run_config

    merged = load_run_config(path, [])
    cluster = merged["cluster"]
    world = cluster["nodes"] * (cluster.get("gpus_per_node") or cluster.get("tasks_per_node", 1))
    monkeypatch.setattr(bridge_config, "get_world_size_safe", lambda: world)
    config, lossfree = build_config(_named_recipe(path), merged)
    config.optimizer.use_precision_aware_optimizer = False  # needs TE's FusedAdam
    for dtype_field in ("main_grads_dtype", "main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype"):
        setattr(config.optimizer, dtype_field, torch.float32)
    config.model.moe_permute_fusion = False  # needs TE's permutation kernels
    config.model.apply_rope_fusion = False  # needs TE's RoPE kernels
    if config.model.moe_token_dispatcher_type == "flex":  # DeepEP / HybridEP: GPU only
        config.model.moe_token_dispatcher_type = "alltoall"
    for key, value in merged["model"].items():  # the YAML won over the recipe
        if key != "transformer_layer_spec":
            assert getattr(config.model, key) == value, key
    if config.model.transformer_layer_spec is gpt_provider.default_layer_spec:
        config.model.transformer_layer_spec = gpt_provider.local_layer_spec
    assert enable_lossfree(config, lossfree) is not None
    assert config.model.moe_router_enable_expert_bias is False  # ours, not Megatron's
    bridge_config.runtime_config_update(config)  # pretrain()'s own: mixed precision, then validate()
    assert config.data_parallel_size * config.model.tensor_model_parallel_size \
        * config.model.pipeline_model_parallel_size * config.model.context_parallel_size == world
    # This process is pipeline rank 0; DeepSeek-V3's first stage holds only
    # its dense layers. Build that stage's spec (it must not fail), then the
    # last stage's, which holds MoE layers.
    config.model.transformer_layer_spec(config.model)
    from megatron.core import parallel_state

    last_stage = config.model.pipeline_model_parallel_size - 1
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_rank", lambda *a, **k: last_stage)
    spec = config.model.transformer_layer_spec(config.model)
    modules = _spec_modules(spec)
    assert LossFreeRouter in modules
    assert not any(m.__name__ == "TopKRouter" for m in modules)


# --- export: a tiny DeepSeek-V3 model, exported, routes the same in transformers ---

PARITY_LOGITS_ATOL = 1e-4  # float32 on both sides; measured max difference is printed


def _tiny_deepseek_v3_hf_config():
    from transformers import DeepseekV3Config

    # Sigmoid, 8 experts in 4 groups, top-4 from 2 groups (4 / 2 = 2: Hugging
    # Face's top-2 group score is Megatron's), one shared expert, first layer dense.
    return DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=64,
        rope_scaling=None, num_nextn_predict_layers=0, tie_word_embeddings=False,
        architectures=["DeepseekV3ForCausalLM"], torch_dtype="float32",
    )


def _cpu_float32(provider) -> None:
    """The provider's Transformer Engine / GPU-kernel switches off, float32, no dropout."""
    import torch
    from cpu_mla import local_mla_block_spec

    provider.transformer_layer_spec = local_mla_block_spec
    for name in ("bf16", "fp16", "gradient_accumulation_fusion", "bias_activation_fusion",
                 "bias_dropout_fusion", "masked_softmax_fusion", "persist_layer_norm",
                 "moe_permute_fusion", "cross_entropy_loss_fusion", "apply_rope_fusion",
                 "moe_shared_expert_overlap", "moe_grouped_gemm"):
        setattr(provider, name, False)
    provider.params_dtype = torch.float32
    provider.pipeline_dtype = torch.float32
    provider.hidden_dropout = provider.attention_dropout = 0.0
    provider.moe_router_load_balancing_type = "none"
    provider.moe_aux_loss_coeff = 0.0


def test_export_to_hf_keeps_every_tokens_experts(one_rank, tmp_path):
    """Bridge's DeepSeek-V3 provider + the flag -> bias trained by the balancer ->
    export_to_hf -> transformers picks the same experts for every token."""
    from types import SimpleNamespace

    import torch
    from megatron.bridge import AutoBridge
    from transformers import AutoModelForCausalLM

    from nemo_lossfree.balancer import LossFreeBalancer
    from nemo_lossfree.config import LossFreeConfig
    from nemo_lossfree.integrations.bridge import enable_lossfree
    from nemo_lossfree.integrations.export import export_to_hf
    from nemo_lossfree.router import LossFreeRouter

    torch.manual_seed(0)
    bridge = AutoBridge.from_hf_config(_tiny_deepseek_v3_hf_config())
    provider = bridge.to_megatron_provider(load_weights=False)
    assert provider.moe_router_enable_expert_bias is True  # the DeepSeek-V3 bridge's own setting
    _cpu_float32(provider)
    enable_lossfree(SimpleNamespace(model=provider), {"enabled": True})  # takes the flag over
    model = _provide(provider)
    routers = _routers(model)
    assert len(routers) == 1 and type(routers[0]) is LossFreeRouter  # layer 0 is dense

    # Train the bias: forward + backward per batch, one balancer step each.
    balancer = LossFreeBalancer([model], LossFreeConfig(update_rate=0.05, schedule="constant"))
    tokens = torch.randint(0, 128, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    for _ in range(4):
        model(input_ids=torch.randint(0, 128, (2, 16)), position_ids=positions,
              attention_mask=None).float().pow(2).mean().backward()
        balancer.step()
    bias = routers[0].expert_bias.clone()
    assert bias.abs().min() > 0 and bias.min() < 0  # trained, centered: some negative

    chosen = {}
    model.eval()
    hook = routers[0].register_forward_hook(lambda mod, args, out: chosen.__setitem__("megatron", out[1]))
    with torch.no_grad():
        # Megatron pads the vocabulary (make_vocab_size_divisible_by); the export trims it.
        logits_megatron = model(input_ids=tokens, position_ids=positions, attention_mask=None)[..., :128]
    hook.remove()

    export_to_hf([model], bridge, tmp_path / "hf")
    assert torch.equal(routers[0].expert_bias, bias)  # the shift was for the save only
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    moe = hf_model.model.layers[1].mlp
    exported = moe.gate.e_score_correction_bias
    assert torch.allclose(exported - bias, (exported - bias)[0].expand_as(bias)) and exported.min() == 0

    # Megatron orders tokens [sequence, batch], transformers [batch, sequence].
    map_megatron = chosen["megatron"].view(16, 2, -1).transpose(0, 1).reshape(32, -1)
    map_hf, logits_hf = _hf_routing_and_logits(hf_model, tokens)
    assert torch.equal(map_hf, map_megatron)
    difference = (logits_hf - logits_megatron).abs().max().item()
    print(f"export parity: max |logits_hf - logits_megatron| = {difference:.2e}")
    assert difference < PARITY_LOGITS_ATOL

    # The same model through a checkpoint on disk and `nemo-lossfree export`, as a user
    # runs it. The balancer is attached as in a run, so run_config.yaml holds its
    # finalize_model_grads wrapper too; Bridge's own save writes the checkpoint.
    balancer.attach(provider)
    bridge.save_megatron_model([model], tmp_path / "megatron")
    _save_family_config_and_tokenizer(tmp_path / "hf-config")
    command = [
        sys.executable, str(ROOT / "tests" / "_support" / "bridge_lane" / "run_with_stand_ins.py"),
        "-m", "nemo_lossfree.apps.cli", "export", str(tmp_path / "megatron"),
        "--hf-model", str(tmp_path / "hf-config"), "--hf-path", str(tmp_path / "hf-from-checkpoint"),
        # The run's spec is a CPU stand-in for Transformer Engine's MLA (cpu_mla.py).
        "--layer-spec", "cpu_mla:local_mla_block_spec",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "exported " in result.stdout
    assert (tmp_path / "hf-from-checkpoint" / "tokenizer.json").is_file()  # the family's tokenizer went along
    from_checkpoint = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-from-checkpoint",
                                                           dtype=torch.float32).eval()
    in_memory = hf_model.state_dict()
    on_disk = from_checkpoint.state_dict()
    assert on_disk.keys() == in_memory.keys()
    assert all(torch.equal(on_disk[key], in_memory[key]) for key in in_memory)  # bias shift included
    map_disk, logits_disk = _hf_routing_and_logits(from_checkpoint, tokens)
    assert torch.equal(map_disk, map_megatron)
    difference_disk = (logits_disk - logits_megatron).abs().max().item()
    print(f"export parity (checkpoint -> nemo-lossfree export): max |logits_hf - logits_megatron| = "
          f"{difference_disk:.2e}, vs the in-memory export {(logits_disk - logits_hf).abs().max().item():.2e}")
    assert difference_disk < PARITY_LOGITS_ATOL


def _save_family_config_and_tokenizer(folder: Path) -> None:
    """What --hf-model names: the family's config and a tokenizer (a 128-word one: offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    _tiny_deepseek_v3_hf_config().save_pretrained(folder)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0").save_pretrained(folder)


def _hf_routing_and_logits(hf_model, tokens):
    """Which experts layer 1 picks per token (a [tokens, experts] map, batch-major) and the logits."""
    import torch

    moe = hf_model.model.layers[1].mlp
    route = moe.route_tokens_to_experts
    chosen = {}

    def recording(router_logits):
        indices, weights = route(router_logits)
        chosen["hf"] = indices
        return indices, weights

    moe.route_tokens_to_experts = recording
    try:
        with torch.no_grad():
            logits = hf_model(input_ids=tokens).logits
    finally:
        del moe.route_tokens_to_experts
    experts = moe.gate.e_score_correction_bias.numel()
    routing_map = torch.zeros(chosen["hf"].shape[0], experts, dtype=torch.bool)
    return routing_map.scatter_(1, chosen["hf"], True), logits
