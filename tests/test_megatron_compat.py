"""megatron_compat, one test per shim, against the Megatron-Core minor installed.

`make test` runs these on 0.19; .ci/lanes/25-mcore-versions.sh runs them on
the oldest supported minor in CI and on every older one with
MCORE_LANE_VERSIONS=all (`make mcore-versions-test`), where the shims are the
code path.
"""

import pytest
import torch
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from packaging.version import Version

from nemo_lossfree import megatron_compat
from nemo_lossfree.balancer import LossFreeBalancer, layer_id
from nemo_lossfree.router import LossFreeRouter
from nemo_lossfree.testing.models import gpt_moe_layer_spec, gpt_moe_model, moe_transformer_config

RELEASE = Version(megatron_compat.MEGATRON_CORE_VERSION).release[:2]
T, E, K = 64, 16, 4
# With precomputed_indices (0.19) the router uses it; the router_replay path must agree with it.
PATHS = [False, True] if megatron_compat.HAS_PRECOMPUTED_INDICES else [False]


def test_features_are_detected_as_the_releases_have_them():
    """The detections agree with the release each feature came in (the module's docstring)."""
    assert RELEASE >= (0, 16) and "router" in MoESubmodules.__dataclass_fields__
    assert megatron_compat.HAS_PRECOMPUTED_INDICES == (RELEASE >= (0, 19))
    assert megatron_compat.HAS_IS_MTP_LAYER == (RELEASE >= (0, 17))
    assert ("sqrtsoftplus" in megatron_compat.SCORE_FUNCTIONS) == (RELEASE >= (0, 18))
    for name, (present, since) in megatron_compat.UPSTREAM_FEATURES.items():
        assert present == (RELEASE >= Version(since).release), name
        assert (megatron_compat.missing_upstream_feature(name) is None) == present


class _RecordTopK:
    """A router_replay that lets upstream choose and keeps its indices (in its order)."""

    def get_replay_topk(self, scores, topk, num_groups, group_topk, compute_topk):
        values, self.indices = compute_topk(scores, topk, num_groups, group_topk)
        return values, self.indices


def _logits(seed=0):
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("pre_softmax", [False, True])
@pytest.mark.parametrize("groups", [None, (4, 2)])
@pytest.mark.parametrize("scaling_factor", [None, 2.5])
def test_gates_at_upstreams_own_choice_are_upstreams_routing(
    score_function, pre_softmax, groups, scaling_factor
):
    """Given the experts upstream itself picks, gate_at_indices returns upstream's routing bit for bit."""
    if score_function == "sqrtsoftplus" and (why := megatron_compat.missing_upstream_feature("sqrtsoftplus")):
        pytest.skip(why)
    gating = dict(score_function=score_function, use_pre_softmax=pre_softmax, scaling_factor=scaling_factor)
    if groups:
        gating.update(num_groups=groups[0], group_topk=groups[1])
    logits = _logits()
    probs, routing_map = moe_utils.topk_routing_with_score_function(logits, K, **gating)
    recorder = _RecordTopK()
    assert all(map(torch.equal, moe_utils.topk_routing_with_score_function(
        logits, K, router_replay=recorder, **gating), (probs, routing_map)))
    indices = recorder.indices
    for use_precomputed in PATHS:
        ours_probs, ours_map = megatron_compat.gate_at_indices(
            logits, K, indices, use_precomputed_indices=use_precomputed, **gating
        )
        assert torch.equal(ours_map, routing_map)
        assert torch.equal(ours_probs, probs)


@pytest.mark.parametrize("groups", [None, (4, 2)])
def test_gates_at_a_biased_choice_are_upstreams_expert_bias_routing(groups):
    """Selection on sigmoid scores + bias, gates from the unbiased scores: upstream's own
    sigmoid expert-bias routing, on every minor."""
    gating = dict(score_function="sigmoid")
    if groups:
        gating.update(num_groups=groups[0], group_topk=groups[1])
    logits = _logits(1)
    bias = torch.randn(E, generator=torch.Generator().manual_seed(2)) * 0.5
    probs, routing_map = moe_utils.topk_routing_with_score_function(logits, K, expert_bias=bias, **gating)
    biased = torch.sigmoid(logits) + bias
    if groups:
        _, indices = moe_utils.group_limited_topk(biased, K, T, E, *groups)
    else:
        indices = torch.topk(biased, K, dim=1).indices
    assert not torch.equal(routing_map, moe_utils.topk_routing_with_score_function(logits, K, **gating)[1])
    for use_precomputed in PATHS:
        ours_probs, ours_map = megatron_compat.gate_at_indices(
            logits, K, indices, use_precomputed_indices=use_precomputed, **gating
        )
        assert torch.equal(ours_map, routing_map)
        assert torch.equal(ours_probs, probs)


def _router_config(**overrides):
    fields = dict(num_layers=1, hidden_size=32, num_attention_heads=4, num_experts=E, topk=K)
    fields.update(overrides)
    return moe_transformer_config(**fields)


def test_router_gates_through_precomputed_indices_where_upstream_has_them(pg_collection, monkeypatch):
    calls = []
    upstream = moe_utils.topk_routing_with_score_function

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return upstream(*args, **kwargs)

    monkeypatch.setattr(moe_utils, "topk_routing_with_score_function", spy)
    router = LossFreeRouter(_router_config(), pg_collection=pg_collection)
    router(torch.randn(8, 2, 32))
    assert len(calls) == 1
    if megatron_compat.HAS_PRECOMPUTED_INDICES:  # 0.19: upstream's own argument, nothing else
        assert calls[0]["precomputed_indices"] is not None and "router_replay" not in calls[0]
    else:
        assert isinstance(calls[0]["router_replay"], megatron_compat._GivenIndices)


def test_sqrtsoftplus_is_refused_in_one_line_where_megatron_core_lacks_it(pg_collection, monkeypatch):
    config = _router_config(score_function="sqrtsoftplus")
    if "sqrtsoftplus" in megatron_compat.SCORE_FUNCTIONS:  # 0.18+: it routes
        probs, _ = LossFreeRouter(config, pg_collection=pg_collection)(torch.randn(8, 2, 32))
        assert torch.isfinite(probs).all()
        monkeypatch.setattr(megatron_compat, "SCORE_FUNCTIONS", ("softmax", "sigmoid"))
    with pytest.raises(ValueError) as refused:
        LossFreeRouter(config, pg_collection=pg_collection)
    message = str(refused.value)
    assert message.startswith("moe_router_score_function: must be one of softmax, sigmoid with megatron-core ")
    assert "sqrtsoftplus needs megatron-core >= 0.18" in message and "\n" not in message


def test_routers_have_the_attributes_of_0_19s(pg_collection):
    router = LossFreeRouter(_router_config(), pg_collection=pg_collection)
    assert router.frozen_expert_bias is False and router.is_mtp_layer is False
    mtp = LossFreeRouter(_router_config(), pg_collection=pg_collection, is_mtp_layer=True)
    # 0.16's MoELayer never says; its MTP layers carry global numbers instead (next test).
    assert mtp.is_mtp_layer is megatron_compat.HAS_IS_MTP_LAYER


def test_mtp_layer_ids_follow_the_decoder_on_every_minor(single_rank):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    config = moe_transformer_config(num_layers=2, num_experts=8, topk=2, mtp_num_layers=1)
    mtp_spec = get_gpt_mtp_block_spec(config, gpt_moe_layer_spec(8), use_transformer_engine=False)
    model = gpt_moe_model(config, mtp_block_spec=mtp_spec)
    routers = LossFreeBalancer(model).routers
    assert [layer_id(r, i) for i, r in enumerate(routers)] == [1, 2, 3]


def test_router_gating_runs_without_transformer_engine():
    """0.16 without TE left te_general_gemm undefined: every router's gating raised NameError."""
    x = torch.randn(6, 32)
    weight = torch.randn(E, 32)
    out = moe_utils.router_gating_linear(x, weight, None, torch.float32)
    assert torch.allclose(out, x @ weight.t(), atol=1e-5)
