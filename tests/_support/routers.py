"""Stand-alone LossFreeRouters filled with a batch's counts, for balancer tests on one rank."""

import torch

from nemo_lossfree.router import LossFreeRouter
from nemo_lossfree.testing.models import moe_transformer_config
from nemo_lossfree.update import margin_histogram, selection_margins


def routers_with_expert_counts(pg_collection, counts):
    """One router per entry of ``counts`` (its expert count), layer numbers 1, 2, ..."""
    routers = torch.nn.ModuleList()
    for number, experts in enumerate(counts, start=1):
        router = LossFreeRouter(
            moe_transformer_config(num_layers=len(counts), num_experts=experts, topk=2),
            pg_collection=pg_collection,
        )
        router.set_layer_number(number)
        routers.append(router)
    return routers


def quantile_batch(router, seed=0, tokens=64):
    """Fill one router with a batch's counts and margin histogram, as the router records them."""
    experts = router.local_tokens_per_expert.numel()
    scores_TE = torch.rand(tokens, experts, generator=torch.Generator().manual_seed(seed))
    selected_TE = torch.zeros(tokens, experts, dtype=torch.bool)
    selected_TE.scatter_(1, scores_TE.topk(2, dim=-1).indices, True)
    router.local_tokens_per_expert.copy_(selected_TE.sum(dim=0).float())
    router.local_margin_histogram.copy_(margin_histogram(selection_margins(scores_TE, selected_TE, 2)))
