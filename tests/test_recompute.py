"""Tokens are counted once per trained micro-batch whatever activation recompute does."""

import pytest
import torch

from nemo_lossfree.testing.models import gpt_moe_model, moe_transformer_config

RECOMPUTE = {
    "none": {},
    "moe_layer": dict(recompute_granularity="selective", recompute_modules=["moe"]),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def counts_after_one_step(recompute: dict, state=None):
    torch.manual_seed(0)
    config = moe_transformer_config(num_layers=2, num_experts=8, topk=2, **recompute)
    model = gpt_moe_model(config, vocab_size=64, max_sequence_length=16)
    if state is not None:
        model.load_state_dict(state)
    model.train()
    routers = [m for m in model.modules() if hasattr(m, "local_tokens_per_expert")]
    calls = []
    for router in routers:
        router.register_forward_hook(lambda *args: calls.append(1))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(16).unsqueeze(0).expand(2, 16)
    model(ids, pos, None, labels=ids).float().mean().backward()
    return model.state_dict(), torch.stack([r.local_tokens_per_expert for r in routers]), len(calls)


@pytest.mark.parametrize("mode", ["moe_layer", "full"])
def test_recompute_counts_once(single_rank, mode):
    state, reference, calls_plain = counts_after_one_step(RECOMPUTE["none"])
    _, counted, calls_recompute = counts_after_one_step(RECOMPUTE[mode], state)
    # The routers really ran twice (forward, then the recompute pass in backward)...
    assert (calls_plain, calls_recompute) == (2, 4)
    # ...and every token was counted once, exactly as without recompute.
    assert reference.sum() == 2 * 32 * 2  # 2 layers x 32 tokens x top-2
    assert torch.equal(counted, reference)
