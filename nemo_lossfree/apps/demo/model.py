"""The demo's model: a small Megatron-Core GPT-MoE that every arm trains.

Megatron-Core's local layer specs (no Transformer Engine), CPU-initialised
float32 weights and the allgather dispatcher, so it runs on the CPU under
``nemo_lossfree.integrations.cpu``. The arms differ only in their
``TransformerConfig`` fields (``arms.py``) and in whether the router is
``LossFreeRouter``. The ``GPTModel`` of the spec is ``nemo_lossfree.gpt.gpt_model``
(the tests' small models are built there too).
"""

from __future__ import annotations

from typing import Any

import torch

from nemo_lossfree.apps.demo.settings import DemoSettings

#: TransformerConfig fields the CPU demo model fixes, whatever its settings (its
#: run config states them: ``run_config.to_run_config``).
CPU_MODEL_FIELDS: dict[str, Any] = dict(
    moe_router_dtype="fp32",
    moe_token_dispatcher_type="allgather",
    moe_grouped_gemm=False,
    add_bias_linear=False,
    bf16=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)


def settings_fields(settings: DemoSettings) -> dict[str, Any]:
    """The TransformerConfig fields a ``DemoSettings`` sets (the model's shape and routing)."""
    s = settings
    fields: dict[str, Any] = dict(
        num_layers=s.dense_layers + s.num_layers,
        hidden_size=s.hidden_size,
        num_attention_heads=s.num_attention_heads,
        ffn_hidden_size=2 * s.hidden_size,
        num_moe_experts=s.experts,
        moe_ffn_hidden_size=s.moe_ffn_hidden_size,
        moe_router_topk=s.topk,
        moe_router_score_function=s.score_function,
    )
    if s.dense_layers:
        fields["moe_layer_freq"] = [0] * s.dense_layers + [1] * s.num_layers
    return fields


def transformer_config(settings: DemoSettings, arm_fields: dict[str, Any], expert_model_parallel_size: int):
    """The ``TransformerConfig`` of one arm: the settings' shape, the CPU fields, then the arm's fields.
    Megatron's refusal is a ``ValueError`` of one line naming the ``model.`` key (``runconfig``'s one build)."""
    from nemo_lossfree.runconfig.transformer_config import build

    fields = dict(
        settings_fields(settings), **CPU_MODEL_FIELDS,
        expert_model_parallel_size=expert_model_parallel_size,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    fields.update(arm_fields)
    return build(fields)


def layer_spec(settings: DemoSettings, config, *, loss_free: bool):
    """Megatron-Core's local layer spec, or its block spec when dense and MoE layers mix
    (moe_layer_freq); LossFreeRouter for loss_free; SDPA core attention (attention.py)."""
    from nemo_lossfree.apps.demo.attention import with_sdpa_attention
    from nemo_lossfree.spec import use_loss_free_router

    if settings.dense_layers:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = get_gpt_layer_local_spec(num_experts=settings.experts, moe_grouped_gemm=False)
    if loss_free:
        spec = use_loss_free_router(spec)
    return with_sdpa_attention(spec)
