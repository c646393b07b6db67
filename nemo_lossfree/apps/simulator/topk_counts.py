"""Exact per-expert counts of top-K on ``scores + offset``, fast for a fixed token pool.

The simulator routes the same pool of tokens again and again while only a
per-expert vector (bias + drift + noise) changes, and changes slowly. A full
``torch.topk`` over ``[tokens, experts]`` costs ~3 us per token on one core at
256 experts. Instead each block of tokens keeps, per token, its ``M`` best
experts under the offset ``v_ref`` the block was last fully routed with
("candidates"), and a step does top-K over ``[tokens, M]`` under the current
offset ``v``. An expert outside the candidates scores at most
``next_ref + max(v - v_ref)``, where ``next_ref`` is the token's (M+1)-th
best value under ``v_ref``; when the K-th best candidate beats that, the
result is exact. The same bound, with the reference value of candidate
``m + 1``, makes top-K over the first ``m < M`` candidates exact too, so most
tokens are decided on the first ``m`` (half of M) columns, the rest on all M,
and the few left over are routed again over all experts. When those are more
than a few percent of a block, the whole block is routed over all experts
and its candidates are refreshed under ``v``.
"""

from __future__ import annotations

from typing import Callable

import torch

# Default tokens per block: the unit of sampling (see environment.py) and of work.
BLOCK_TOKENS = 4096
# Refresh a block's candidates when more than this fraction of its tokens are unsure.
REFRESH_WHEN_UNSURE_ABOVE = 0.05


class CandidateTopK:
    """Counts for one pool of tokens; ``rows(start, stop)`` returns full score rows.

    Args:
        rows: callable giving the float32 scores ``[stop - start, E]`` of pool
            tokens ``start:stop`` (recomputed on demand, so the full pool need
            not stay in memory).
        num_tokens: tokens in the pool.
        num_experts: E.
        topk: K.
        candidates: M (default ``max(4K, 32)``, at most E).
        block_tokens: tokens per block (the pool is used in whole blocks).
    """

    def __init__(self, rows: Callable[[int, int], torch.Tensor], num_tokens: int,
                 num_experts: int, topk: int, candidates: int = 0,
                 block_tokens: int = BLOCK_TOKENS) -> None:
        if not 1 <= topk <= num_experts:
            raise ValueError(f"topk: must be between 1 and the number of experts ({num_experts}), got {topk}")
        self.rows = rows
        self.num_tokens, self.num_experts, self.topk = num_tokens, num_experts, topk
        self.block_tokens = block_tokens
        self.num_blocks = -(-num_tokens // block_tokens)
        self.candidates = min(num_experts, candidates or max(4 * topk, 32))
        # First level: top-K over the first m candidates only.
        self.first = max(topk, self.candidates // 2)
        self.cand_scores = torch.empty(num_tokens, self.candidates, dtype=torch.float32)
        self.cand_experts = torch.empty(num_tokens, self.candidates, dtype=torch.int32)
        self.next_ref = torch.full((num_tokens,), float("inf"), dtype=torch.float32)
        self.first_ref = torch.full((num_tokens,), float("inf"), dtype=torch.float32)
        self.reference_BE = torch.zeros(self.num_blocks, num_experts)
        # Blocks whose candidates were never built (built on first use).
        self.built_B = torch.zeros(self.num_blocks, dtype=torch.bool)
        self.fallback_tokens = 0
        self.refreshed_blocks = 0

    def _span(self, block: int) -> tuple[int, int]:
        start = block * self.block_tokens
        return start, min(start + self.block_tokens, self.num_tokens)

    def _route_block_fully(self, block: int, offset_E: torch.Tensor) -> torch.Tensor:
        """Top-K over all experts; refreshes the block's candidates under ``offset_E``."""
        start, stop = self._span(block)
        scores_TE = self.rows(start, stop)
        m = self.candidates
        take = min(m + 1, self.num_experts)
        values, experts = torch.topk(scores_TE + offset_E, take, dim=1, sorted=True)
        self.cand_scores[start:stop] = torch.gather(scores_TE, 1, experts[:, :m])
        self.cand_experts[start:stop] = experts[:, :m].int()
        self.next_ref[start:stop] = values[:, m] if take > m else -float("inf")
        self.first_ref[start:stop] = values[:, self.first] if take > self.first else -float("inf")
        self.reference_BE[block] = offset_E
        self.built_B[block] = True
        self.refreshed_blocks += 1
        return experts[:, : self.topk]

    def _route_block(self, block: int, offset_E: torch.Tensor) -> torch.Tensor:
        """``[tokens, K]`` chosen experts of one block under ``offset_E``."""
        if not self.built_B[block]:
            return self._route_block_fully(block, offset_E)
        start, stop = self._span(block)
        # The most any expert can have gained since the block's build.
        gained = (offset_E - self.reference_BE[block]).max()
        # Level 1: the first m candidates; every other expert's value is at
        # most first_ref + gained (candidates are sorted by reference value).
        experts_Tm = self.cand_experts[start:stop, : self.first]
        biased_Tm = self.cand_scores[start:stop, : self.first] + offset_E[experts_Tm]
        values_TK, slots_TK = torch.topk(biased_Tm, self.topk, dim=1, sorted=False)
        chosen_TK = torch.gather(experts_Tm, 1, slots_TK)
        unsure_T = values_TK.amin(dim=1) <= self.first_ref[start:stop] + gained
        if not bool(unsure_T.any()):
            return chosen_TK
        # Level 2: all M candidates of the unsure tokens; others <= next_ref + gained.
        rows_T = unsure_T.nonzero().squeeze(1) + start
        experts_UM = self.cand_experts[rows_T]
        values_UK, slots_UK = torch.topk(self.cand_scores[rows_T] + offset_E[experts_UM],
                                         self.topk, dim=1, sorted=False)
        chosen_TK[rows_T - start] = torch.gather(experts_UM, 1, slots_UK)
        if self.candidates == self.num_experts:
            return chosen_TK
        still_U = values_UK.amin(dim=1) <= self.next_ref[rows_T] + gained
        unsure = int(still_U.sum())
        if unsure == 0:
            return chosen_TK
        if unsure > REFRESH_WHEN_UNSURE_ABOVE * (stop - start):
            self.fallback_tokens += stop - start
            return self._route_block_fully(block, offset_E)
        # Level 3: all experts for the last few.
        self.fallback_tokens += unsure
        rows_U = rows_T[still_U] - start
        full_UE = self.rows(start, stop)[rows_U] + offset_E
        chosen_TK[rows_U] = torch.topk(full_UE, self.topk, dim=1, sorted=False)[1].int()
        return chosen_TK

    def histogram(self, offset_E: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``[E, 2, B]`` margin histogram of top-K over ``scores + offset_E`` (the quantile rule).

        Routes every token over all experts: the margins need every expert's
        score, not only the candidates' (about 10x the cost of ``counts``).
        """
        from nemo_lossfree.update import margin_histogram, selection_margins

        offset_E = offset_E.float()
        total = None
        for block in blocks.tolist():
            start, stop = self._span(block)
            biased_TE = self.rows(start, stop) + offset_E
            selected_TE = torch.zeros_like(biased_TE, dtype=torch.bool)
            selected_TE.scatter_(1, torch.topk(biased_TE, self.topk, dim=1).indices, True)
            hist = margin_histogram(selection_margins(biased_TE, selected_TE, self.topk))
            total = hist if total is None else total + hist
        return total

    def counts(self, offset_E: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """float64 ``[E]`` tokens per expert of top-K over ``scores + offset_E``.

        ``blocks`` are indices of ``block_tokens``-token blocks of the pool.
        """
        offset_E = offset_E.float()
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64)
        for block in blocks.tolist():
            chosen_TK = self._route_block(block, offset_E)
            counts_E += torch.bincount(chosen_TK.reshape(-1), minlength=self.num_experts)
        return counts_E.double()


def reference_counts(scores_TE: torch.Tensor, offset_E: torch.Tensor, topk: int) -> torch.Tensor:
    """The plain computation the class above must equal (tests)."""
    chosen = torch.topk(scores_TE + offset_E, topk, dim=1).indices
    return torch.bincount(chosen.reshape(-1), minlength=scores_TE.shape[1]).double()
