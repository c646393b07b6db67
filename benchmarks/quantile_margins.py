"""The quantile rule's cutoffs: exact coordinate margins against qb_dual_update's.

    python benchmarks/quantile_margins.py

Routes one fixed batch of synthetic sigmoid scores (skewed expert popularity)
again and again and applies the quantile step after each pass, once with this
project's margins (an expert that would gain a token is measured against the
token's K-th biased score) and once with Megatron-Core's (every expert against
the (K+1)-th). Prints MaxVio of the batch after each step, for a full step
(u = 1) and the default half step (u = 0.5). Same histogram, same quantile:
only the cutoff differs.
"""

from __future__ import annotations

import torch

from nemo_lossfree.metrics import max_violation
from nemo_lossfree.update import compute_bias_update, margin_histogram, selection_margins

SHAPES = ((4096, 16, 2), (999, 16, 3), (3000, 8, 1), (5000, 64, 6), (20000, 64, 8))
STEPS = 6


def trace(scores_TE: torch.Tensor, topk: int, rate: float, upstream: bool) -> list[float]:
    bias_E = torch.zeros(scores_TE.shape[1])
    out = []
    for _ in range(STEPS + 1):
        biased_TE = scores_TE + bias_E
        selected_TE = torch.zeros_like(biased_TE, dtype=torch.bool)
        selected_TE.scatter_(1, torch.topk(biased_TE, topk, dim=1).indices, True)
        counts_E = selected_TE.sum(0).double()
        out.append(float(max_violation(counts_E)))
        hist = margin_histogram(selection_margins(biased_TE, selected_TE, topk, upstream_cutoff=upstream))
        bias_E = compute_bias_update(counts_E, bias_E, rate=rate, rule="quantile", center=True,
                                     histogram=hist)
    return out


def main() -> None:
    gen = torch.Generator().manual_seed(1)
    print("| tokens | E | K | u | cutoff | MaxVio after steps 0.." + str(STEPS) + " |")
    print("|---:|---:|---:|---:|---|---|")
    for tokens, experts, topk in SHAPES:
        popularity_E = torch.randn(experts, generator=gen) * 0.5
        scores_TE = torch.sigmoid(torch.randn(tokens, experts, generator=gen) + popularity_E)
        for rate in (1.0, 0.5):
            for upstream in (False, True):
                values = ", ".join(f"{v:.3f}" for v in trace(scores_TE, topk, rate, upstream))
                name = "(K+1)-th for all (qb_dual_update)" if upstream else "exact (ours)"
                print(f"| {tokens} | {experts} | {topk} | {rate:g} | {name} | {values} |")


if __name__ == "__main__":
    main()
