"""Routing scores for the simulator: synthetic pools and recorded ones.

A *pool* is a set of tokens with their unbiased router scores ``s[t, i]``
(after the score function). Each simulated step routes a sample of whole
blocks of a pool. What changes over time is a per-expert offset in score
units (drift and noise, see ``environment.py``), which the selection adds to
the bias: top-K of ``s + b + offset``.

Synthetic logits are low-rank, as a router's are (``h_t W`` with a
low-dimensional token state), plus a fixed per-expert popularity::

    logits[t, i] = token_spread * (h_t . w_i) + skew * p_i,
    h_t ~ N(0, I_r / r), w_i ~ N(0, I_r), p_i ~ N(0, 1)

so ``skew`` is the spread of expert popularity in logit units relative to
the per-token spread. Rows are recomputed from ``h`` when needed, so a pool
of 10^6 tokens costs 64 bytes per token plus the candidate cache.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from nemo_lossfree.config import check_integer, check_nonnegative
from nemo_lossfree.scores import check_score_function, router_scores

SCORE_KINDS = ("logits", "scores")
TOKEN_RANK = 16


class SyntheticPool:
    """``num_tokens`` synthetic tokens over ``num_experts`` experts (see the module doc)."""

    def __init__(self, *, num_tokens: int, num_experts: int, score_function: str = "sigmoid",
                 skew: float = 1.0, token_spread: float = 1.0, seed: int = 0) -> None:
        check_integer("num_tokens", num_tokens, minimum=1)
        check_integer("num_experts", num_experts, minimum=2)
        check_nonnegative("skew", skew)
        check_nonnegative("token_spread", token_spread)
        check_score_function(score_function, "score_function")
        generator = torch.Generator().manual_seed(seed)
        self.num_tokens, self.num_experts = num_tokens, num_experts
        self.score_function = score_function
        self.tokens_Tr = torch.randn(num_tokens, TOKEN_RANK, generator=generator) / math.sqrt(TOKEN_RANK)
        self.experts_rE = torch.randn(TOKEN_RANK, num_experts, generator=generator) * token_spread
        self.popularity_E = torch.randn(num_experts, generator=generator) * skew

    def rows(self, start: int, stop: int) -> torch.Tensor:
        logits = torch.addmm(self.popularity_E, self.tokens_Tr[start:stop], self.experts_rE)
        return router_scores(logits, self.score_function)


class RecordedPool:
    """Tokens whose logits or scores were recorded from a run: ``[tokens, experts]``."""

    def __init__(self, values_TE: torch.Tensor, *, kind: str, score_function: str) -> None:
        if kind not in SCORE_KINDS:
            raise ValueError(f"scores kind: must be one of {', '.join(SCORE_KINDS)}; got {kind!r}")
        values_TE = values_TE.float()
        self.scores_TE = router_scores(values_TE, score_function) if kind == "logits" else values_TE
        self.scores_TE = self.scores_TE.contiguous()
        self.num_tokens, self.num_experts = self.scores_TE.shape

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.scores_TE[start:stop]


def load_recorded(path: str, *, kind: Optional[str], score_function: str) -> list[RecordedPool]:
    """Pools from a ``.pt`` file: a tensor ``[steps, tokens, experts]`` or ``[tokens, experts]``.

    The file may also hold a dict with one tensor under ``"logits"`` or
    ``"scores"``; that key then says what the values are. A bare tensor is
    read as ``kind`` (default logits). Each recorded step becomes one pool.
    """
    try:
        with warnings.catch_warnings():  # a plain pickle's protocol warning: the error below says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip, EOF, key and weights-only errors: no common base class
        # torch's own messages are many lines (or a bare "101"); say what the file must be.
        reason = f"torch.load raised {type(exc).__name__}"
        if "Weights only load failed" in str(exc):
            reason = "it holds Python objects besides tensors, which are not loaded (weights_only)"
        raise ValueError(
            f"--scores {path}: not a torch file of scores (torch.save of a tensor, or of a dict with "
            f"one tensor under logits or scores); {reason}"
        ) from None
    if isinstance(loaded, dict):
        keys = [k for k in SCORE_KINDS if k in loaded]
        if len(keys) != 1:
            raise ValueError(
                f"--scores {path}: a dict must hold exactly one of the keys {', '.join(SCORE_KINDS)}; "
                f"found {sorted(map(str, loaded))}"
            )
        if kind is not None and kind != keys[0]:
            raise ValueError(f"--scores-kind {kind} contradicts the file's key {keys[0]!r}")
        kind, loaded = keys[0], loaded[keys[0]]
    if not isinstance(loaded, torch.Tensor):
        raise ValueError(f"--scores {path}: expected a tensor or a dict of one tensor, got {type(loaded).__name__}")
    if loaded.dim() == 2:
        loaded = loaded.unsqueeze(0)
    if loaded.dim() != 3 or loaded.shape[-1] < 2 or loaded.shape[1] < 1:
        raise ValueError(
            f"--scores {path}: expected shape [steps, tokens, experts] or [tokens, experts] "
            f"with >= 2 experts, got {list(loaded.shape)}"
        )
    if not torch.isfinite(loaded.float()).all():
        raise ValueError(f"--scores {path}: the tensor holds non-finite values")
    return [RecordedPool(step, kind=kind or "logits", score_function=score_function) for step in loaded]
