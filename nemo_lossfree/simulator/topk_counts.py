"""Exact per-expert counts of top-K on ``scores + offset``, fast for a fixed token pool.

The simulator routes the same pool of tokens again and again while only a
per-expert vector (bias + drift + noise) changes, and changes slowly. A full
``torch.topk`` over ``[tokens, experts]`` costs ~3 us per token on one core at
256 experts; instead each token keeps its ``M`` best experts under a
reference offset ``v_ref`` ("candidates", found once), and a step does top-K
over ``[tokens, M]`` under the current offset ``v``. An expert outside the
candidates scores at most ``next_ref + max(v - v_ref)``, where ``next_ref``
is the token's (M+1)-th best value under ``v_ref``; when the K-th best
candidate beats that, the result is exact. The few tokens where it does not
are routed again over all experts; when they stop being few, the candidates
are rebuilt under the current offset (and ``M`` doubles if that keeps
happening).
"""

from __future__ import annotations

from typing import Callable

import torch

# Default tokens per block: the unit of sampling (see pool.py) and of chunked work.
BLOCK_TOKENS = 4096
# Rebuild the candidate cache under the current offset when more than this
# fraction of a step's tokens needed the full fallback.
REBUILD_WHEN_FALLBACK_ABOVE = 0.05


class CandidateTopK:
    """Counts for one pool of tokens; ``rows(start, stop)`` returns full score rows.

    Args:
        rows: callable giving the float32 scores ``[stop - start, E]`` of pool
            tokens ``start:stop`` (recomputed on demand, so the full pool need
            not stay in memory).
        num_tokens: tokens in the pool.
        num_experts: E.
        topk: K.
        candidates: initial M (grows on demand, at most E).
        block_tokens: tokens per block (the pool is used in whole blocks).
    """

    def __init__(self, rows: Callable[[int, int], torch.Tensor], num_tokens: int,
                 num_experts: int, topk: int, candidates: int = 0,
                 block_tokens: int = BLOCK_TOKENS) -> None:
        if not 1 <= topk <= num_experts:
            raise ValueError(f"topk: must be between 1 and the number of experts ({num_experts}), got {topk}")
        self.rows = rows
        self.block_tokens = block_tokens
        self.num_tokens = num_tokens
        self.num_experts = num_experts
        self.topk = topk
        self.candidates = min(num_experts, max(candidates, 2 * topk, 16))
        self.fallback_tokens = 0
        self.rebuilds = 0
        self._build(torch.zeros(num_experts))
        self._initial = self._state()

    def _state(self):
        return (self.candidates, self.cand_scores, self.cand_experts, self.next_ref, self.reference_E)

    def restart(self) -> None:
        """Back to the cache built under a zero offset (a new simulation starts from b = 0)."""
        (self.candidates, self.cand_scores, self.cand_experts, self.next_ref,
         self.reference_E) = self._initial
        self.steps_since_build = 0

    def _build(self, reference_E: torch.Tensor) -> None:
        """Best M experts per token under ``reference_E``: raw scores, experts, (M+1)-th value."""
        m = self.candidates
        cand_scores = torch.empty(self.num_tokens, m, dtype=torch.float32)
        cand_experts = torch.empty(self.num_tokens, m, dtype=torch.int32)
        next_ref = torch.full((self.num_tokens,), -float("inf"), dtype=torch.float32)
        take = min(m + 1, self.num_experts)
        for start in range(0, self.num_tokens, BLOCK_TOKENS):
            stop = min(start + BLOCK_TOKENS, self.num_tokens)
            scores_TE = self.rows(start, stop)
            values, experts = torch.topk(scores_TE + reference_E, take, dim=1, sorted=True)
            cand_scores[start:stop] = torch.gather(scores_TE, 1, experts[:, :m])
            cand_experts[start:stop] = experts[:, :m].int()
            if take > m:
                next_ref[start:stop] = values[:, m]
        self.cand_scores, self.cand_experts, self.next_ref = cand_scores, cand_experts, next_ref
        self.reference_E = reference_E.clone()
        self.steps_since_build = 0

    def _rebuild(self, reference_E: torch.Tensor) -> None:
        # Rebuilt twice in a row: the offset moves faster than M can absorb.
        if self.steps_since_build <= 1 and self.candidates < self.num_experts:
            self.candidates = min(self.num_experts, 2 * self.candidates)
        self.rebuilds += 1
        self._build(reference_E)

    def counts(self, offset_E: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """float64 ``[E]`` tokens per expert of top-K over ``scores + offset_E``.

        ``blocks`` are indices of ``block_tokens``-token blocks of the pool.
        """
        offset_E = offset_E.float()
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64)
        # The most any non-candidate expert can have gained since the build.
        gained = (offset_E - self.reference_E).max()
        fallback = routed = 0
        for block in blocks.tolist():
            start = block * self.block_tokens
            stop = min(start + self.block_tokens, self.num_tokens)
            routed += stop - start
            experts_TM = self.cand_experts[start:stop]
            biased_TM = self.cand_scores[start:stop] + offset_E[experts_TM]
            values_TK, slots_TK = torch.topk(biased_TM, self.topk, dim=1, sorted=False)
            chosen_TK = torch.gather(experts_TM, 1, slots_TK)
            # Exact unless an expert outside the candidates could still win.
            unsure_T = values_TK.amin(dim=1) <= self.next_ref[start:stop] + gained
            if self.candidates < self.num_experts and bool(unsure_T.any()):
                rows_T = unsure_T.nonzero().squeeze(1)
                fallback += rows_T.numel()
                full_TE = self.rows(start, stop)[rows_T] + offset_E
                chosen_TK = chosen_TK.clone()
                chosen_TK[rows_T] = torch.topk(full_TE, self.topk, dim=1, sorted=False)[1].int()
            counts_E += torch.bincount(chosen_TK.reshape(-1), minlength=self.num_experts)
        self.fallback_tokens += fallback
        self.steps_since_build += 1
        if fallback > REBUILD_WHEN_FALLBACK_ABOVE * routed and self.candidates < self.num_experts:
            self._rebuild(offset_E)
        return counts_E.double()


def reference_counts(scores_TE: torch.Tensor, offset_E: torch.Tensor, topk: int) -> torch.Tensor:
    """The plain computation the class above must equal (tests)."""
    chosen = torch.topk(scores_TE + offset_E, topk, dim=1).indices
    return torch.bincount(chosen.reshape(-1), minlength=scores_TE.shape[1]).double()
