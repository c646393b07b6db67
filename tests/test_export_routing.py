"""Export's routing traps: target refusals and the routing-invariant bias shift.

The Hugging Face side is written out here as the DeepSeek-V3 family routes
(sigmoid scores, bias for the selection only, group score = top-2 sum, losing
groups filled with ``mask_value``): transformers fills -inf, DeepSeek's
released modeling code and some vLLM / SGLang versions 0.0. Megatron-Core's
side is its own ``topk_routing_with_score_function``. The end-to-end check
(a real exported checkpoint loaded by transformers) is in the Bridge lane.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nemo_lossfree.integrations.export import check_routing_exportable, shift_for_export

TOKENS, EXPERTS, GROUPS, GROUP_TOPK, TOPK = 512, 16, 4, 2, 4


def _megatron_selection(scores_logits_TE, bias_E):
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    probs, routing_map = topk_routing_with_score_function(
        scores_logits_TE, TOPK, num_groups=GROUPS, group_topk=GROUP_TOPK,
        score_function="sigmoid", expert_bias=bias_E,
    )
    return probs, routing_map


def _hf_family_selection(logits_TE, bias_E, mask_value):
    scores = logits_TE.sigmoid()
    biased = scores + bias_E
    group_scores = biased.view(-1, GROUPS, EXPERTS // GROUPS).topk(2, dim=-1)[0].sum(-1)
    group_idx = group_scores.topk(GROUP_TOPK, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, GROUPS, EXPERTS // GROUPS).reshape(-1, EXPERTS)
    chosen = biased.masked_fill(~score_mask.bool(), mask_value).topk(TOPK, dim=-1)[1]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, chosen, True)


def _trained_like_bias():
    # Centered, as LossFreeRouter keeps it, and large next to sigmoid scores (a
    # long run that pushed down a few hot experts per group): one expert per
    # group raised, three lowered, so a chosen group offers fewer than top-k
    # positive biased scores and 0.0-masked experts compete.
    per_group = torch.tensor([1.2, -0.4, -0.4, -0.4])
    jitter = torch.randn(EXPERTS, generator=torch.Generator().manual_seed(1)) * 0.05
    bias_E = per_group.repeat(GROUPS) + jitter
    return bias_E - bias_E.mean()


def test_shift_makes_every_biased_score_positive_and_keeps_megatrons_routing():
    torch.manual_seed(0)
    logits_TE = torch.randn(TOKENS, EXPERTS) * 2
    bias_E = _trained_like_bias()
    shifted_E = shift_for_export(bias_E)
    assert shifted_E.min().item() == 0.0
    assert torch.allclose(shifted_E - bias_E, (shifted_E - bias_E)[0].expand(EXPERTS))
    assert ((logits_TE.sigmoid() + shifted_E) > 0).all()
    probs, routing_map = _megatron_selection(logits_TE, bias_E)
    probs_shifted, routing_map_shifted = _megatron_selection(logits_TE, shifted_E)
    assert torch.equal(routing_map, routing_map_shifted)
    assert torch.equal(probs, probs_shifted)  # gates come from the unbiased scores
    # A bias that is already non-negative is left alone.
    assert torch.equal(shift_for_export(shifted_E + 0.25), shifted_E + 0.25)


def test_zero_masking_picks_masked_experts_unless_the_bias_is_shifted():
    torch.manual_seed(0)
    logits_TE = torch.randn(TOKENS, EXPERTS) * 2
    bias_E = _trained_like_bias()
    _, megatron_map = _megatron_selection(logits_TE, bias_E)
    # -inf masking (transformers) matches Megatron with or without the shift.
    assert torch.equal(_hf_family_selection(logits_TE, bias_E, float("-inf")), megatron_map)
    # 0.0 masking with the centered bias: masked experts win on some tokens (the trap) ...
    unshifted = _hf_family_selection(logits_TE, bias_E, 0.0)
    assert (unshifted != megatron_map).any(dim=-1).sum() > 0
    # ... and with the exported (shifted) bias never.
    assert torch.equal(_hf_family_selection(logits_TE, shift_for_export(bias_E), 0.0), megatron_map)


def _config(**overrides):
    fields = dict(moe_router_score_function="sigmoid", moe_router_num_groups=GROUPS,
                  moe_router_group_topk=GROUP_TOPK, moe_router_topk=TOPK)
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_deepseek_v3_style_routing_is_exportable():
    check_routing_exportable(_config(), "DeepseekV3ForCausalLM")
    check_routing_exportable(_config(moe_router_num_groups=None, moe_router_group_topk=None, moe_router_topk=6),
                             "DeepseekV3ForCausalLM")


@pytest.mark.parametrize("architecture", ["Qwen3MoeForCausalLM", "GptOssForCausalLM", "MixtralForCausalLM"])
def test_targets_without_a_bias_slot_are_refused(architecture):
    with pytest.raises(ValueError, match=rf"^export: {architecture} has no expert-bias slot"):
        check_routing_exportable(_config(), architecture)


def test_softmax_with_bias_is_refused():
    with pytest.raises(ValueError, match=r"^model.moe_router_score_function: is 'softmax'"):
        check_routing_exportable(_config(moe_router_score_function="softmax"), "DeepseekV3ForCausalLM")


def test_group_score_other_than_top2_is_refused():
    # top 6 of 2 groups: Megatron sums each group's top 3, Hugging Face its top 2.
    with pytest.raises(ValueError, match=r"^model.moe_router_topk / moe_router_group_topk: is 6/2: "
                                         r"Megatron scores a group by its top 3"):
        check_routing_exportable(_config(moe_router_topk=6), "DeepseekV3ForCausalLM")
