"""LossFreeRouter against Megatron-Core's TopKRouter on the same weights and inputs."""

import pytest
import torch

from nemo_lossfree.router import LossFreeRouter
from nemo_lossfree.testing.models import moe_transformer_config

E = 16


def make_config(**overrides):
    fields = dict(num_layers=1, hidden_size=32, num_attention_heads=4, num_experts=E, topk=4)
    fields.update(overrides)
    return moe_transformer_config(**fields)


def make_pair(pg_collection, bias=None, **overrides):
    """(ours, upstream TopKRouter with expert bias) sharing weights and bias."""
    from megatron.core.transformer.moe.router import TopKRouter

    ours = LossFreeRouter(make_config(**overrides), pg_collection=pg_collection)
    theirs = TopKRouter(make_config(expert_bias=True, **overrides), pg_collection=pg_collection)
    theirs.weight.data.copy_(ours.weight.data)
    if bias is not None:
        ours.expert_bias.copy_(bias)
        theirs.expert_bias.copy_(bias)
    return ours, theirs


def hidden(tokens=256, seed=0):
    return torch.randn(tokens // 4, 4, 32, generator=torch.Generator().manual_seed(seed))


def spread_bias(seed=1):
    return torch.randn(E, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("groups", [None, (4, 2)])
def test_same_routing_and_gates_as_upstream_for_sigmoid(pg_collection, groups):
    overrides = {}
    if groups:
        overrides = dict(moe_router_num_groups=groups[0], moe_router_group_topk=groups[1])
    ours, theirs = make_pair(pg_collection, bias=spread_bias(), **overrides)
    x = hidden()
    probs_ours, map_ours = ours(x)
    probs_theirs, map_theirs = theirs(x)
    assert torch.equal(map_ours, map_theirs)
    assert torch.equal(probs_ours, probs_theirs)


def test_bias_changes_selection_but_never_the_gate_values(pg_collection):
    router, _ = make_pair(pg_collection)
    x = hidden()
    with torch.no_grad():
        logits = router.gating(x).view(-1, E)
        scores = torch.sigmoid(logits)
    bias = torch.zeros(E)
    bias[:4] = 10.0  # force experts 0..3 into every token's top-4
    router.expert_bias.copy_(bias)
    probs, routing_map = router(x)
    assert routing_map[:, :4].all() and not routing_map[:, 4:].any()
    # Gates are the unbiased scores of the chosen experts, normalised (topk > 1, sigmoid).
    expected = scores[:, :4] / scores[:, :4].sum(dim=-1, keepdim=True)
    assert torch.allclose(probs[:, :4], expected, atol=1e-6)
    assert torch.all(probs[:, 4:] == 0)


@pytest.mark.parametrize("pre_softmax", [False, True])
def test_softmax_scores_take_the_bias_too(pg_collection, pre_softmax):
    from megatron.core.transformer.moe.router import TopKRouter

    cfg = dict(score_function="softmax", moe_router_pre_softmax=pre_softmax)
    router = LossFreeRouter(make_config(**cfg), pg_collection=pg_collection)
    upstream = TopKRouter(make_config(**cfg), pg_collection=pg_collection)
    upstream.weight.data.copy_(router.weight.data)
    x = hidden()
    # Zero bias: exactly upstream's softmax routing.
    probs, routing_map = router(x)
    probs_up, map_up = upstream(x)
    assert torch.equal(routing_map, map_up)
    assert torch.allclose(probs, probs_up, atol=1e-6)
    # A bias on the score scale moves selection; gates stay unbiased softmax values.
    bias = torch.zeros(E)
    bias[5] = 1.0
    router.expert_bias.copy_(bias)
    probs_b, map_b = router(x)
    assert map_b[:, 5].all()
    with torch.no_grad():
        logits = router.gating(x).view(-1, E)
    chosen = map_b.nonzero()[:, 1].view(-1, 4)
    if pre_softmax:
        expected = torch.softmax(logits, dim=-1).gather(1, chosen)
    else:
        expected = torch.softmax(logits.gather(1, chosen), dim=-1)
    assert torch.allclose(probs_b.gather(1, chosen), expected, atol=1e-6)


def run_training_forward(router, x, padding_mask=None, backward=True):
    probs, _ = router(x, padding_mask=padding_mask)
    if backward:
        probs.sum().backward()
    return probs


def test_counts_are_committed_by_backward_once(pg_collection):
    router, _ = make_pair(pg_collection)
    router.train()
    x = hidden()
    probs = run_training_forward(router, x, backward=False)
    assert router.local_tokens_per_expert.sum() == 0  # forward alone counts nothing yet
    probs.sum().backward()
    assert router.local_tokens_per_expert.sum() == x.shape[0] * x.shape[1] * 4
    assert router.local_tokens_per_expert.dtype == torch.float32


def test_counts_match_the_routing_map_and_skip_padding(pg_collection):
    router, _ = make_pair(pg_collection, bias=spread_bias())
    router.train()
    x = hidden()
    padding = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
    padding[-5:, :] = True  # the last 5 positions of every sequence are padding
    probs, routing_map = router(x, padding_mask=padding)
    probs.sum().backward()
    valid = ~padding.reshape(-1)
    expected = routing_map[valid].sum(dim=0).float()
    assert torch.equal(router.local_tokens_per_expert, expected)
    assert expected.sum() == valid.sum() * 4


def test_padding_mask_when_tokens_equal_experts(pg_collection):
    # Megatron-Core 0.19.2 computes routing_map & ~padding_mask ([T, E] & [T]):
    # it only "works" when T == E, masking experts instead of tokens.
    router, _ = make_pair(pg_collection)
    router.train()
    x = torch.randn(E // 2, 2, 32)  # T == E == 16
    padding = torch.zeros(E // 2, 2, dtype=torch.bool)
    padding[0, 0] = True  # token 0 is padding
    probs, routing_map = router(x, padding_mask=padding)
    probs.sum().backward()
    expected = routing_map[1:].sum(dim=0).float()
    assert torch.equal(router.local_tokens_per_expert, expected)


def test_no_counts_in_eval_or_under_no_grad(pg_collection):
    router, _ = make_pair(pg_collection)
    x = hidden()
    router.eval()
    router(x)
    router.train()
    with torch.no_grad():
        router(x)
    assert router.local_tokens_per_expert.sum() == 0


def _torch_non_reentrant(fn, x):
    return torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)


def _megatron_reentrant(fn, x):
    from megatron.core import tensor_parallel

    return tensor_parallel.checkpoint(fn, False, x)


@pytest.mark.parametrize("checkpoint", [_torch_non_reentrant, _megatron_reentrant])
def test_activation_checkpoint_counts_once(pg_collection, checkpoint):
    router, _ = make_pair(pg_collection)
    router.train()
    x = hidden().requires_grad_(True)

    def routed(inp):
        probs, _ = router(inp)
        return probs

    checkpoint(routed, x).sum().backward()
    assert router.local_tokens_per_expert.sum() == x.shape[0] * x.shape[1] * 4


def test_buffers_stay_float32_and_exact_under_bf16(pg_collection):
    from megatron.core.transformer.module import Float16Module

    router, _ = make_pair(pg_collection)
    bias = torch.tensor([1e-4 * (i + 1) for i in range(E)], dtype=torch.float32) + 1.0
    router.expert_bias.copy_(bias)  # distinct in fp32, collapsed in bf16 (spacing 2**-7 near 1)
    assert len(set(bias.bfloat16().tolist())) < E
    config = make_config(bf16=True, params_dtype=torch.bfloat16)
    wrapped = Float16Module(config, router)
    inner = wrapped.module
    assert inner.weight.dtype == torch.bfloat16
    assert inner.expert_bias.dtype == torch.float32
    assert inner.local_tokens_per_expert.dtype == torch.float32
    assert torch.equal(inner.expert_bias, bias)
    # The balancer state in the model keeps its dtypes too (a bf16 integral or gain would drift).
    from nemo_lossfree.router import STATE_BUFFERS
    from nemo_lossfree.update import UPDATE_STATE_LAYOUT

    assert inner.lossfree_steps.dtype == torch.int64
    for key, (dtype, _) in UPDATE_STATE_LAYOUT.items():
        assert getattr(inner, STATE_BUFFERS[key]).dtype == dtype, key
    state = inner.state_dict()
    saved = state["_extra_state"]
    assert saved["steps"].dtype == torch.int64 and saved["gain"].dtype == torch.float64
    assert state["expert_bias"].dtype == torch.float32 and torch.equal(state["expert_bias"], bias)
    assert "local_tokens_per_expert" not in state
    other, _ = make_pair(pg_collection)
    other.bfloat16()
    other.load_state_dict(state)
    assert other.expert_bias.dtype == torch.float32 and torch.equal(other.expert_bias, bias)


def test_bf16_inputs_count_in_float32(pg_collection):
    router, _ = make_pair(pg_collection, moe_router_dtype=None)
    router.bfloat16()
    router.train()
    x = torch.randn(300, 8, 32, dtype=torch.bfloat16)  # 2400 tokens: not exact in bf16 sums
    probs, _ = router(x)
    probs.float().sum().backward()
    assert router.local_tokens_per_expert.dtype == torch.float32
    assert router.local_tokens_per_expert.sum().item() == 2400 * 4


@pytest.mark.parametrize("value", [True, 1, "true", "false", ""])
def test_refuses_megatron_expert_bias_flag(pg_collection, value):
    # Anything but False, None or 0: Megatron-Core reads the flag by truthiness ("false" is on).
    with pytest.raises(ValueError, match=r"^moe_router_enable_expert_bias: must be false"):
        LossFreeRouter(make_config(expert_bias=value), pg_collection=pg_collection)
    for off in (False, None, 0):
        LossFreeRouter(make_config(expert_bias=off), pg_collection=pg_collection)


def test_refuses_sinkhorn(pg_collection):
    with pytest.raises(ValueError, match="moe_router_load_balancing_type: 'sinkhorn'"):
        LossFreeRouter(make_config(load_balancing_type="sinkhorn", topk=1), pg_collection=pg_collection)


def test_no_cuda_device_query(pg_collection, monkeypatch):
    def no_cuda():
        raise AssertionError("torch.cuda.current_device() called")

    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    router = LossFreeRouter(make_config(), pg_collection=pg_collection)
    router.train()
    probs, _ = router(hidden())
    probs.sum().backward()
    assert router.expert_bias.device.type == "cpu"


def test_aux_loss_still_works_alongside(pg_collection):
    router = LossFreeRouter(
        make_config(load_balancing_type="aux_loss", aux_loss_coeff=1e-2), pg_collection=pg_collection
    )
    router.train()
    x = hidden()
    probs, _ = router(x)
    probs.sum().backward()
    # The aux loss reaches the router weight through MoEAuxLossAutoScaler.
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert router.local_tokens_per_expert.sum() == x.shape[0] * x.shape[1] * 4


def test_warns_when_no_balancer_runs(pg_collection, monkeypatch):
    from nemo_lossfree import router as router_module

    monkeypatch.setattr(router_module, "UNBALANCED_FORWARDS_WARNING", 3)
    router, _ = make_pair(pg_collection)
    router.train()
    x = hidden(tokens=16)
    with pytest.warns(RuntimeWarning, match="without a bias update"):
        for _ in range(3):
            run_training_forward(router, x)
