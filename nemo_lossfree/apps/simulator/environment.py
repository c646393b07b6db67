"""What every simulated strategy sees, step by step: token samples, drift, noise.

All strategies of one comparison replay the same environment (common random
numbers), so their differences come from the update rule alone.

At step t the selection is top-K over ``s[t, i] + b[i] + offset_t[i]`` with

    offset_t = drift_t + noise * n_t,   drift_t = drift_{t-1} + drift * e_t,
    n_t, e_t ~ N(0, I_E)

in score units: ``drift`` moves expert popularity as a random walk (the data
or the router changing under the bias), ``noise`` is per-step jitter. The
tokens of step t are whole blocks of a pool, drawn without replacement while
the pool is large enough, so the counts carry the sampling noise of a batch.
"""

from __future__ import annotations

import time
from typing import Sequence, Union

import torch

from nemo_lossfree.apps.simulator.scores import RecordedPool, SyntheticPool
from nemo_lossfree.apps.simulator.topk_counts import BLOCK_TOKENS, CandidateTopK
from nemo_lossfree.config import check_integer, check_nonnegative

Pool = Union[SyntheticPool, RecordedPool]


class Environment:
    """Pools, their candidate caches, and the per-step offsets and samples.

    Args:
        pools: one pool (synthetic or a recorded step), or one per recorded
            step (step t uses pool ``t % len(pools)``).
        topk: K.
        tokens_per_step: tokens routed per step (rounded up to whole blocks;
            capped by the pool's size for recorded pools).
        steps: number of steps to prepare.
        drift, noise: see the module doc (score units).
        seed: seeds the samples, the drift and the noise.
    """

    def __init__(self, pools: Sequence[Pool], *, topk: int, tokens_per_step: int, steps: int,
                 drift: float = 0.0, noise: float = 0.0, seed: int = 0) -> None:
        if not pools:
            raise ValueError("pools: need at least one pool of tokens")
        check_integer("steps", steps, minimum=1)
        check_integer("tokens", tokens_per_step, minimum=1)
        check_nonnegative("drift", drift)
        check_nonnegative("noise", noise)
        experts = {p.num_experts for p in pools}
        if len(experts) != 1:
            raise ValueError(f"pools: all pools need the same number of experts, got {sorted(experts)}")
        self.num_experts = experts.pop()
        self.topk, self.steps = topk, steps
        self.block_tokens = min(BLOCK_TOKENS, tokens_per_step, min(p.num_tokens for p in pools))
        started = time.perf_counter()
        self.engines = [
            CandidateTopK(p.rows, p.num_tokens, self.num_experts, topk, block_tokens=self.block_tokens)
            for p in pools
        ]
        self.setup_s = time.perf_counter() - started
        generator = torch.Generator().manual_seed(seed)
        steps_E = (steps, self.num_experts)
        drift_SE = torch.cumsum(torch.randn(steps_E, generator=generator) * drift, dim=0)
        self.offsets_SE = drift_SE + torch.randn(steps_E, generator=generator) * noise
        self.blocks: list[torch.Tensor] = []
        self.repeats_tokens = False
        wanted_blocks = -(-tokens_per_step // self.block_tokens)
        for step in range(steps):
            engine = self.engines[step % len(self.engines)]
            available = -(-engine.num_tokens // self.block_tokens)
            if wanted_blocks <= available:
                blocks = torch.randperm(available, generator=generator)[:wanted_blocks]
            else:  # pool smaller than a step: blocks repeat within the step
                self.repeats_tokens = True
                blocks = torch.randint(0, available, (wanted_blocks,), generator=generator)
            self.blocks.append(blocks)
        self.tokens_per_step = [
            sum(min(self.block_tokens, self.engines[s % len(self.engines)].num_tokens - b * self.block_tokens)
                for b in self.blocks[s].tolist())
            for s in range(steps)
        ]

    def counts(self, step: int, bias_E: torch.Tensor) -> torch.Tensor:
        """float64 ``[E]`` tokens per expert at ``step`` under ``bias_E``."""
        engine = self.engines[step % len(self.engines)]
        return engine.counts(bias_E.float() + self.offsets_SE[step], self.blocks[step])

    def histogram(self, step: int, bias_E: torch.Tensor) -> torch.Tensor:
        """``[E, 2, B]`` margin histogram at ``step`` under ``bias_E`` (the quantile rule's input)."""
        engine = self.engines[step % len(self.engines)]
        return engine.histogram(bias_E.float() + self.offsets_SE[step], self.blocks[step])

    @property
    def fallback_tokens(self) -> int:
        return sum(e.fallback_tokens for e in self.engines)

    @property
    def refreshed_blocks(self) -> int:
        return sum(e.refreshed_blocks for e in self.engines)

    @property
    def candidates(self) -> int:
        return max(e.candidates for e in self.engines)
