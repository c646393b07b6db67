"""Export a model trained with ``LossFreeRouter`` to a Hugging Face checkpoint, routing intact.

    from megatron.bridge import AutoBridge
    from nemo_lossfree.integrations.export import export_to_hf

    bridge = AutoBridge.from_hf_pretrained("deepseek-ai/DeepSeek-V3")   # the family's HF config
    export_to_hf(model, bridge, "exported/")    # model: the list of Megatron model chunks

The conversion is Megatron-Bridge's own (``bridge.save_hf_pretrained``): its
DeepSeek-family mappings carry ``decoder.layers.N.mlp.router.expert_bias`` to
``model.layers.N.mlp.gate.e_score_correction_bias``. ``LossFreeRouter`` keeps
that buffer under Megatron-Core's own name, so the same call exports a model
trained with Megatron's ``moe_router_enable_expert_bias``.

What this adds, because the Hugging Face side routes differently from
Megatron-Core in ways a plain conversion does not see:

- Targets. Only families whose Hugging Face router has the bias slot and
  applies it to the selection (``HF_BIAS_TARGETS``: sigmoid scores,
  DeepSeek-V3 style) can carry a trained bias. Qwen3-MoE, GPT-OSS, Mixtral,
  OLMoE have no slot: the bias would be dropped and the experts chosen would
  change, so export refuses them with one line, and it refuses softmax + bias
  models for every target (no Hugging Face family applies a bias to softmax
  scores).
- Group score. With group-limited routing (``moe_router_num_groups`` > 1)
  Megatron-Core scores a group by the sum of its top
  ``moe_router_topk / moe_router_group_topk`` biased scores; these Hugging Face
  families always sum the top 2. When the two differ, groups (and so experts)
  differ: export refuses.
- Masked groups. Some inference code (DeepSeek's released
  ``modeling_deepseek.py``, some vLLM / SGLang versions) fills the experts of
  losing groups with 0.0 rather than -inf before the final top-k. A centered
  bias (ours: mean 0) makes some biased scores negative, and then a masked
  expert (0.0) can beat a chosen group's expert. Export therefore shifts every
  layer's bias by one constant so that its smallest entry is 0: sigmoid scores
  are positive, so every biased score is then positive. Adding a constant to
  all experts' biased scores changes no top-k and, with k scores summed per
  group, no group ranking either; the gate weights use unbiased scores. The
  routing is unchanged (``shift_for_export``; tested against both maskings).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence, Union

if TYPE_CHECKING:  # imported where used: `nemo-lossfree export` checks its flags without torch
    import torch


class ExportRefused(ValueError):
    """An export that would route differently, or input it cannot use: one line, naming the field or flag."""


#: Hugging Face architectures whose router applies ``e_score_correction_bias``
#: to sigmoid scores for the selection only (group score = top-2 sum).
HF_BIAS_TARGETS = ("DeepseekV3ForCausalLM", "Glm4MoeForCausalLM")
#: How these targets score a group: the sum of its top 2 biased scores.
HF_GROUP_SCORE_TOP = 2


def check_routing_exportable(config: Any, architecture: str) -> None:
    """Refuse (``ExportRefused``, a ``ValueError``, one line) an export whose routing the target would change.

    ``config`` is the model's ``TransformerConfig`` (or a Bridge provider);
    ``architecture`` the Hugging Face class name (``config.architectures[0]``).
    """
    if architecture not in HF_BIAS_TARGETS:
        raise ExportRefused(
            f"export: {architecture} has no expert-bias slot in Hugging Face transformers (the trained "
            f"bias would be dropped and other experts chosen); targets that apply it: "
            f"{', '.join(HF_BIAS_TARGETS)}"
        )
    score = getattr(config, "moe_router_score_function", None)
    if score != "sigmoid":
        raise ExportRefused(
            f"model.moe_router_score_function: is {score!r}; the Hugging Face targets with an expert bias "
            f"({', '.join(HF_BIAS_TARGETS)}) apply it to sigmoid scores only, so a {score} + bias model "
            "has no Hugging Face target"
        )
    groups = getattr(config, "moe_router_num_groups", None) or 1
    if groups > 1:
        group_topk = getattr(config, "moe_router_group_topk", None) or 1
        per_group = config.moe_router_topk // group_topk
        if per_group != HF_GROUP_SCORE_TOP:
            raise ExportRefused(
                f"model.moe_router_topk / moe_router_group_topk: is {config.moe_router_topk}/{group_topk}: "
                f"Megatron scores a group by its top {per_group} biased scores, {architecture} by its top "
                f"{HF_GROUP_SCORE_TOP}, so other groups would be chosen; export needs topk/group_topk == "
                f"{HF_GROUP_SCORE_TOP}"
            )


def shift_for_export(bias_E: torch.Tensor) -> torch.Tensor:
    """``bias_E`` moved by one constant so its smallest entry is 0 (never moved down).

    Routing-invariant (the same constant on every expert of the layer), and
    with sigmoid scores in (0, 1) every biased score is then > 0, so
    inference code that masks losing groups with 0.0 cannot pick a masked
    expert.
    """
    import torch

    return bias_E - torch.clamp(bias_E.min(), max=0.0)


def _expert_biases(model: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
    return [
        buffer
        for chunk in model
        for name, buffer in chunk.named_buffers()
        if name.endswith("router.expert_bias")
    ]


@contextlib.contextmanager
def shifted_expert_biases(model: Sequence[torch.nn.Module]) -> Iterator[int]:
    """Every router's ``expert_bias`` shifted for export inside the block; restored after."""
    import torch

    biases = _expert_biases(model)
    saved = [b.detach().clone() for b in biases]
    try:
        with torch.no_grad():
            for bias in biases:
                bias.copy_(shift_for_export(bias))
        yield len(biases)
    finally:
        with torch.no_grad():
            for bias, original in zip(biases, saved):
                bias.copy_(original)


def export_to_hf(model: Union[torch.nn.Module, Sequence[torch.nn.Module]], bridge: Any,
                 path: Union[str, Path], **save_kwargs: Any) -> None:
    """Save ``model`` (Megatron model chunks) as a Hugging Face checkpoint at ``path``.

    ``bridge`` is a Megatron-Bridge ``AutoBridge`` for the target family
    (``AutoBridge.from_hf_pretrained(...)`` or ``from_hf_config(...)``).
    Checks the target with ``check_routing_exportable``, shifts the biases
    (``shift_for_export``) for the save only, then calls Bridge's
    ``save_hf_pretrained`` (collective: every rank calls it). Extra keyword
    arguments go to ``save_hf_pretrained``.
    """
    import torch
    from megatron.core.utils import get_model_config

    from nemo_lossfree.integrations.bridge import register_router_for_conversion

    register_router_for_conversion()
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    hf_config = getattr(bridge.hf_pretrained, "config", bridge.hf_pretrained)
    architectures = getattr(hf_config, "architectures", None) or [type(hf_config).__name__]
    check_routing_exportable(get_model_config(chunks[0]), architectures[0])
    with shifted_expert_biases(chunks) as count:
        if count == 0:
            raise ExportRefused("export: the model has no router.expert_bias buffer (no MoE layer with a bias)")
        save_kwargs.setdefault("show_progress", False)
        bridge.save_hf_pretrained(chunks, path, **save_kwargs)
