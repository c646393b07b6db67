"""Megatron-Core's own expert bias and LossFreeRouter share one checkpoint key.

A recipe that trained with ``moe_router_enable_expert_bias=True`` continues
under ``lossfree.enabled`` (the Bridge integration takes the flag over), and a
LossFreeRouter checkpoint continues under Megatron's own update: both through
``megatron.core.dist_checkpointing``, both training on from the saved bias.
"""

from __future__ import annotations

import copy

import pytest
import torch

from nemo_lossfree.compat import take_over_upstream_expert_bias
from nemo_lossfree.config import LossFreeConfig
from nemo_lossfree.testing.models import gpt_moe_model, moe_transformer_config
from nemo_lossfree.update import compute_bias_update

VOCAB, SEQ, BATCH = 64, 16, 4
RATE = 1e-2


def _upstream_config():
    return moe_transformer_config(num_layers=2, num_experts=8, expert_bias=True, bias_update_rate=RATE)


def _taken_over(config):
    taken = copy.deepcopy(config)
    assert take_over_upstream_expert_bias(taken, RATE)
    return taken


def _biases(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("router.expert_bias")}


def _routers(model):
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in model.modules() if isinstance(m, TopKRouter)]


def _train_step(model, config, seed, balancer=None):
    """One global batch with the model's own bias update; returns the counts it used."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    model(ids, pos, None, labels=ids).float().mean().backward()
    counts = [r.local_tokens_per_expert.clone() for r in _routers(model)]
    if balancer is not None:
        balancer.step()
    else:
        _update_router_expert_bias([model], config)
    return counts


def _save_and_load(source, target, path, strict="assume_ok_unexpected"):
    from megatron.core import dist_checkpointing

    path.mkdir()
    dist_checkpointing.save({"model": source.sharded_state_dict()}, str(path))
    loaded = dist_checkpointing.load({"model": target.sharded_state_dict()}, str(path), strict=strict)
    target.load_state_dict(loaded["model"])


@pytest.mark.parametrize("upstream_first", [True, False], ids=["megatron_to_lossfree", "lossfree_to_megatron"])
def test_checkpoints_continue_training_across_the_two_routers(single_rank, tmp_path, upstream_first):
    from nemo_lossfree.balancer import LossFreeBalancer
    from nemo_lossfree.router import LossFreeRouter

    upstream = _upstream_config()
    ours = _taken_over(upstream)
    settings = LossFreeConfig(update_rule="sign", update_rate=RATE, center=False)
    torch.manual_seed(0)
    if upstream_first:
        source = gpt_moe_model(upstream, vocab_size=VOCAB, max_sequence_length=SEQ, loss_free=False)
        target = gpt_moe_model(ours, vocab_size=VOCAB, max_sequence_length=SEQ)
        source_balancer = None
        target_balancer = LossFreeBalancer(target, settings)
    else:
        source = gpt_moe_model(ours, vocab_size=VOCAB, max_sequence_length=SEQ)
        target = gpt_moe_model(upstream, vocab_size=VOCAB, max_sequence_length=SEQ, loss_free=False)
        source_balancer = LossFreeBalancer(source, settings)
        target_balancer = None
    assert sorted(_biases(source)) == sorted(_biases(target))  # the same keys
    assert (type(_routers(target)[0]) is LossFreeRouter) is upstream_first

    for seed in range(3):
        _train_step(source, upstream, seed, source_balancer)
    saved = _biases(source)
    assert all(b.abs().sum() > 0 for b in saved.values())  # trained, not the zero start
    # An upstream checkpoint has no balancer state (LossFreeRouter's _extra_state):
    # loaded non-strictly, as Megatron-LM's --dist-ckpt-strictness log_unexpected does.
    _save_and_load(source, target, tmp_path / "ckpt", "log_unexpected" if upstream_first else "assume_ok_unexpected")
    restored = _biases(target)
    assert all(torch.equal(restored[k], saved[k]) for k in saved)

    # Training continues from the saved bias with the target's own update.
    counts = _train_step(target, upstream, 7, target_balancer)
    after = _biases(target)
    for (key, before), counts_E in zip(sorted(restored.items()), counts):
        expected = compute_bias_update(counts_E, before, rate=RATE, rule="sign", center=False)
        assert torch.allclose(after[key], expected, atol=0, rtol=0), key
        assert not torch.equal(after[key], before), key


def test_the_raw_megatron_core_api_still_refuses_both_biases(single_rank):
    with pytest.raises(ValueError, match=r"^moe_router_enable_expert_bias: must be false"):
        gpt_moe_model(_upstream_config(), vocab_size=VOCAB, max_sequence_length=SEQ)


def test_take_over_leaves_a_config_without_megatrons_bias_alone():
    config = moe_transformer_config(num_layers=1, num_experts=4)
    assert take_over_upstream_expert_bias(config, RATE) is False
    assert config.moe_router_enable_expert_bias is False
