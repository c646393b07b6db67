"""Multi-latent attention on the CPU for the Bridge lane's DeepSeek-V3 models.

megatron-core 0.19.2's local (non-Transformer-Engine) MLA spec builds
``MLASelfAttention`` with ``core_attention=DotProductAttention``, but
``MLASelfAttention`` passes ``k_channels=`` / ``v_channels=`` (query-key and
value head sizes differ in MLA) which only Transformer Engine's
``TEDotProductAttention`` accepts: the local spec fails with
``DotProductAttention.__init__() got an unexpected keyword argument
'k_channels'``. On GPUs the TE spec is used and this never shows.

``CausalCoreAttention`` is the core attention such a spec needs here: plain
causal softmax(QK^T * scale) V through ``torch.nn.functional.scaled_dot_product_attention``,
with MLA's softmax scale, one tensor-parallel rank, no context parallelism.
Everything around it (the MLA projections, rotary embedding, norms, MoE) is
Megatron-Core's, so a parity check against Hugging Face still compares
Megatron's model with transformers' model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class CausalCoreAttention(MegatronModule):
    """Causal scaled-dot-product attention with separate query-key and value head sizes."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 k_channels: Optional[int] = None, v_channels: Optional[int] = None,
                 cp_comm_type: Optional[str] = None, pg_collection: Any = None) -> None:
        super().__init__(config=config)
        if config.tensor_model_parallel_size != 1 or config.context_parallel_size != 1:
            raise ValueError("CausalCoreAttention: one tensor- and context-parallel rank only")
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"CausalCoreAttention: causal attention only, got {attn_mask_type}")
        self.softmax_scale = softmax_scale
        self.hidden_size_per_attention_head_v = v_channels

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("CausalCoreAttention: no attention bias or packed sequences")
        # [s, b, heads, dim] -> [b, heads, s, dim]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale
        )
        seq, batch = query.shape[:2]
        return context.permute(2, 0, 1, 3).reshape(seq, batch, -1)


def _replace_core_attention(node: Any) -> Any:
    from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(node, MLASelfAttentionSubmodules):
        return dataclasses.replace(node, core_attention=CausalCoreAttention)
    if isinstance(node, ModuleSpec):
        replaced = dataclasses.replace(node, submodules=_replace_core_attention(node.submodules))
        return replaced
    if isinstance(node, (list, tuple)):
        return type(node)(_replace_core_attention(x) for x in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return dataclasses.replace(node, **{
            f.name: _replace_core_attention(getattr(node, f.name))
            for f in dataclasses.fields(node) if f.init
        })
    return node


def with_cpu_mla(spec_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``spec_fn(config, ...)`` with every MLA layer's core attention replaced (a spec callable)."""

    def spec(config, *args, **kwargs):
        return _replace_core_attention(spec_fn(config, *args, **kwargs))

    return spec


def local_mla_block_spec(config, vp_stage=None):
    """The DeepSeek-V3 bridge's block spec without Transformer Engine, MLA on the CPU.

    A module-level name, so that a command can be told it by import path
    (``nemo-lossfree export --layer-spec cpu_mla:local_mla_block_spec``).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    return _replace_core_attention(
        get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=vp_stage))
