"""nemo_lossfree.scores: the one home of the router score functions."""

from __future__ import annotations

import pytest
import torch

from nemo_lossfree.scores import SCORE_FUNCTIONS, check_score_function, router_scores

LOGITS = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))


def test_the_functions_are_megatrons():
    assert SCORE_FUNCTIONS == ("softmax", "sigmoid", "sqrtsoftplus")
    torch.testing.assert_close(router_scores(LOGITS, "softmax"), LOGITS.softmax(-1))
    torch.testing.assert_close(router_scores(LOGITS, "sigmoid"), LOGITS.sigmoid())
    torch.testing.assert_close(router_scores(LOGITS, "sqrtsoftplus"),
                               torch.log1p(LOGITS.exp()).sqrt())
    assert router_scores(LOGITS.bfloat16(), "sigmoid").dtype == torch.float32


def test_an_unknown_name_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"^model.moe_router_score_function: must be one of softmax, sigmoid, "
                                         r"sqrtsoftplus; got 'relu'"):
        check_score_function("relu", "model.moe_router_score_function")
    with pytest.raises(ValueError, match=r"^moe_router_score_function: must be one of"):
        router_scores(LOGITS, "relu")


@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
def test_router_and_simulator_score_alike(pg_collection, score_function):
    """The router, the simulator's pools and the demo all take every score function from the one home."""
    from nemo_lossfree.apps.demo.settings import DemoSettings
    from nemo_lossfree.apps.simulator.scores import RecordedPool, SyntheticPool
    from nemo_lossfree.router import LossFreeRouter
    from nemo_lossfree.testing.models import moe_transformer_config

    router = LossFreeRouter(moe_transformer_config(num_experts=8, topk=2, score_function=score_function),
                            pg_collection=pg_collection)
    expected = router_scores(LOGITS, score_function)
    torch.testing.assert_close(router._scores(LOGITS), expected, rtol=0, atol=0)
    pool = RecordedPool(LOGITS, kind="logits", score_function=score_function)
    torch.testing.assert_close(pool.rows(0, 64), expected, rtol=0, atol=0)
    assert SyntheticPool(num_tokens=16, num_experts=8, score_function=score_function).rows(0, 4).shape == (4, 8)
    assert DemoSettings(score_function=score_function).score_function == score_function
