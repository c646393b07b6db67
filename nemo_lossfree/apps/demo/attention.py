"""The demo's core attention: Megatron-Core's DotProductAttention computed by torch's SDPA.

Megatron-Core's local ``DotProductAttention`` materialises the scores and
runs baddbmm, a causal ``masked_fill``, softmax and bmm as separate kernels
with copies between them. On the CPU that was 45% of a demo training step
(torch.profiler, 16 x 128-token sequences, 4 heads of 16). ``torch``'s
``scaled_dot_product_attention`` computes the same causal attention in one
fused kernel with its own backward: the arm takes about a third less time.
The demo is about routing, and attention only reaches it through float
rounding.

Everything but the computation is upstream's (parameters, state dict,
sharded state dict); any case the fused path does not cover (a mask passed
in, dropout, attention bias, packed sequences, a softmax offset,
query-key layer scaling, sliding windows, a non-causal mask type) runs
upstream's forward unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules


class SdpaDotProductAttention(DotProductAttention):
    """``DotProductAttention`` whose plain causal case runs as one SDPA call."""

    def _fused_applies(self, attention_mask, attention_bias, packed_seq_params) -> bool:
        c = self.config
        return (
            attention_mask is None
            and attention_bias is None
            and packed_seq_params is None
            and self.attn_mask_type == AttnMaskType.causal
            and self.softmax_offset is None
            and not c.apply_query_key_layer_scaling
            and c.window_size is None
            and (self.attention_dropout.p == 0 or not self.training)
        )

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if not self._fused_applies(attention_mask, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        # [s, b, heads, head_dim] -> [b, heads, s, head_dim], contiguous as [b, s, heads, head_dim]:
        # the layout the CPU flash kernel's backward is fastest with (a third faster than a permute).
        q, k, v = (t.transpose(0, 1).contiguous().transpose(1, 2) for t in (query, key, value))
        context = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale
        )
        # [b, heads, s, head_dim] -> [s, b, heads * head_dim]
        return context.permute(2, 0, 1, 3).reshape(query.size(0), query.size(1), self.hidden_size_per_partition)


def _with_sdpa_layer(layer: ModuleSpec) -> ModuleSpec:
    submodules = layer.submodules
    if not isinstance(submodules, TransformerLayerSubmodules):
        return layer
    attention = submodules.self_attention
    if not (isinstance(attention, ModuleSpec) and isinstance(attention.submodules, SelfAttentionSubmodules)
            and attention.submodules.core_attention is DotProductAttention):
        return layer
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=SdpaDotProductAttention)
    )
    return dataclasses.replace(layer, submodules=dataclasses.replace(submodules, self_attention=attention))


def with_sdpa_attention(spec: Any) -> Any:
    """A copy of a layer spec or block spec with ``SdpaDotProductAttention`` as core attention."""
    if isinstance(spec, TransformerBlockSubmodules):
        return dataclasses.replace(spec, layer_specs=[_with_sdpa_layer(s) for s in spec.layer_specs])
    if isinstance(spec, ModuleSpec):
        return _with_sdpa_layer(spec)
    raise TypeError(f"spec: expected a ModuleSpec or TransformerBlockSubmodules, got {type(spec).__name__}")
