"""Routing traces: the routers' unbiased scores every N steps, for ``nemo-lossfree simulate --scores``.

Opt-in. ``RoutingTrace(routers, every=N)`` arms the ``LossFreeRouter``s of a
step whose number is a multiple of N (``begin_step``); they keep the
unbiased scores ``[T, E]`` (after the score function, padding left out) of
the micro-batches they train, committed with the counts when the backward
runs, so recomputation records nothing twice. ``end_step`` moves them to
the host; ``save`` writes one file per MoE layer and rank::

    <dir>/trace_layer<n>_rank<r>.pt = {"scores": [steps, tokens, E] float16,
                                       "bias": [steps, E] float32 (what each traced step selected with),
                                       "steps": [steps] int64, "layer": n, "rank": r, "topk": K}

which ``nemo-lossfree simulate --scores <file>`` replays as one pool per
traced step (its ``load_recorded`` reads the ``scores`` key).

Cost, on traced steps only: one more score function over the router's
logits per micro-batch, a boolean index where there is padding (a host
sync), and one device-to-host copy of ``tokens x E`` values per layer at
``end_step``. On disk and in host memory: ``2 x tokens x E`` bytes per layer
per traced step (``max_tokens`` caps the tokens per step and rank: 4096
tokens of 64 experts are 512 KB). Steps that are not traced cost one
``None`` test per router forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from nemo_lossfree.router import LossFreeRouter, ScoreRecording


def _check_positive(name: str, value, *, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be an integer >= 1{' or None' if allow_none else ''}, got {value!r}")


class RoutingTrace:
    """Records the routers' unbiased scores every ``every`` steps (see the module doc).

    Args:
        routers: the model's ``LossFreeRouter`` modules (``LossFreeBalancer.routers``).
        every: trace steps whose number is a multiple of this.
        max_tokens: tokens kept per traced step, layer and rank (None: all).
        dtype: of the stored scores (float16 keeps the top-K order of sigmoid
            scores to ~5e-4; float32 for an exact replay).
    """

    def __init__(self, routers: Iterable[LossFreeRouter], *, every: int, max_tokens: Optional[int] = None,
                 dtype: torch.dtype = torch.float16) -> None:
        _check_positive("every", every)
        _check_positive("max_tokens", max_tokens, allow_none=True)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype: must be one of float16, bfloat16, float32, got {dtype}")
        self.routers = [r for r in routers if isinstance(r, LossFreeRouter)]
        if not self.routers:
            raise ValueError("routers: no LossFreeRouter to trace")
        self.every, self.max_tokens, self.dtype = every, max_tokens, dtype
        self.steps: list[int] = []
        self._scores: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self._biases: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self._step: Optional[int] = None

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def begin_step(self, step: int) -> bool:
        """Arm the routers for ``step`` if it is traced; True if it is."""
        self._step = step if self.due(step) else None
        if self._step is None:
            return False
        for i, router in enumerate(self.routers):
            router.score_recording = ScoreRecording(max_tokens=self.max_tokens, dtype=self.dtype)
            self._biases[i].append(router.expert_bias.detach().float().cpu().clone())
        return True

    def end_step(self) -> None:
        """After the step's backward passes (before or after the balancer's update): keep the scores."""
        if self._step is None:
            return
        for i, router in enumerate(self.routers):
            recording = router.score_recording
            router.score_recording = None
            experts = router.expert_bias.numel()
            chunks = recording.chunks if recording is not None else []
            scores = torch.cat(chunks) if chunks else torch.zeros(0, experts, dtype=self.dtype)
            self._scores[i].append(scores.cpu())
        self.steps.append(self._step)
        self._step = None

    def save(self, directory: Union[str, Path], rank: Optional[int] = None) -> list[Path]:
        """One ``trace_layer<n>_rank<r>.pt`` per layer; steps cut to the fewest tokens any traced step kept."""
        if rank is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for i, router in enumerate(self.routers):
            if not self._scores[i]:
                continue
            tokens = min(s.shape[0] for s in self._scores[i])
            if tokens == 0:
                raise ValueError(f"layer {router.layer_number}: a traced step recorded no token (was it a training "
                                 "step with a backward pass between begin_step and end_step?)")
            path = directory / f"trace_layer{router.layer_number}_rank{rank}.pt"
            torch.save({
                "scores": torch.stack([s[:tokens] for s in self._scores[i]]),
                "bias": torch.stack(self._biases[i][: len(self._scores[i])]),
                "steps": torch.tensor(self.steps, dtype=torch.int64),
                "layer": int(router.layer_number),
                "rank": int(rank),
                "topk": int(router.topk),
            }, path)
            written.append(path)
        return written
