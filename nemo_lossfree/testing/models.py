"""Small Megatron-Core GPT-MoE models for tests, the demo and benchmarks.

Real ``GPTModel``s built from megatron-core's local (no Transformer Engine)
layer specs, so they run on the CPU under ``nemo_lossfree.testing.cpu``.
With sequence parallelism (tensor parallelism > 1, which Megatron-Core
requires for MoE) the norms are ``SequenceParallelTorchNorm``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def moe_transformer_config(
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_experts: int = 8,
    topk: int = 2,
    score_function: str = "sigmoid",
    load_balancing_type: str = "none",
    aux_loss_coeff: float = 0.0,
    expert_bias: bool = False,
    bias_update_rate: float = 1e-3,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    **overrides: Any,
):
    """A TransformerConfig for a small GPT-MoE; ``overrides`` are TransformerConfig fields."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields: dict[str, Any] = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        ffn_hidden_size=2 * hidden_size,
        num_moe_experts=num_experts,
        moe_ffn_hidden_size=hidden_size,
        moe_router_topk=topk,
        moe_router_score_function=score_function,
        moe_router_load_balancing_type=load_balancing_type,
        moe_aux_loss_coeff=aux_loss_coeff,
        moe_router_enable_expert_bias=expert_bias,
        moe_router_bias_update_rate=bias_update_rate,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        sequence_parallel=tensor_model_parallel_size > 1,
        use_cpu_initialization=True,
        add_bias_linear=False,
        bf16=False,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


class SequenceParallelTorchNorm:
    """torch ``LayerNorm`` / ``RMSNorm`` that also serves under sequence parallelism (tests only).

    Megatron-Core's ``WrappedTorchNorm`` refuses sequence parallelism: each
    tensor-parallel rank then normalises its own part of the sequence, so the
    norm's weight gradient is partial, and ``finalize_model_grads`` sums it
    over the tensor-parallel group only for parameters marked
    ``sequence_parallel`` (Transformer Engine's and Apex's norms mark theirs).
    This one marks them; the arithmetic is torch's.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused: Any):
        norm_classes = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norm_classes:
            raise ValueError(
                f"normalization: must be one of {sorted(norm_classes)}, got {config.normalization!r}"
            )
        norm = norm_classes[config.normalization](hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def gpt_moe_layer_spec(num_experts: int, *, loss_free: bool = True, sequence_parallel: bool = False):
    """Megatron-Core's local GPT layer spec with MoE, LossFreeRouter optional.

    ``sequence_parallel`` puts ``SequenceParallelTorchNorm`` in place of the
    layer's torch norms.
    """
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False)
    if sequence_parallel:
        spec.submodules = dataclasses.replace(
            spec.submodules,
            input_layernorm=SequenceParallelTorchNorm,
            pre_mlp_layernorm=SequenceParallelTorchNorm,
        )
    if loss_free:
        from nemo_lossfree.spec import use_loss_free_router

        spec = use_loss_free_router(spec)
    return spec


def gpt_moe_block_spec(config, *, loss_free: bool = True):
    """The decoder block of ``config``'s layers; with its sequence parallelism, every norm supports it.

    A block spec, because a layer spec alone gets Megatron-Core's default
    final norm (``WrappedTorchNorm`` on the CPU).
    """
    from megatron.core.models.gpt.gpt_layer_specs import LNImpl
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layer = gpt_moe_layer_spec(
        config.num_moe_experts, loss_free=loss_free, sequence_parallel=config.sequence_parallel
    )
    final_norm = SequenceParallelTorchNorm if config.sequence_parallel else LNImpl
    return TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=final_norm)


def gpt_moe_model(
    config,
    *,
    vocab_size: int = 256,
    max_sequence_length: int = 64,
    loss_free: bool = True,
    layer_spec: Optional[Any] = None,
    **model_kwargs: Any,
):
    """A ``GPTModel`` for ``config`` (from ``moe_transformer_config``).

    Without ``layer_spec``: Megatron-Core's local layer spec, or with sequence
    parallelism the block of ``gpt_moe_block_spec``.
    """
    from nemo_lossfree.gpt import gpt_model

    if layer_spec is not None:
        spec = layer_spec
    elif config.sequence_parallel:
        spec = gpt_moe_block_spec(config, loss_free=loss_free)
    else:
        spec = gpt_moe_layer_spec(config.num_moe_experts, loss_free=loss_free)
    return gpt_model(config, spec, vocab_size=vocab_size, max_sequence_length=max_sequence_length,
                     **model_kwargs)
