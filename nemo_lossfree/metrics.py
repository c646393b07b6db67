"""Balance metrics: MaxVio (Wang et al. 2024) and bias statistics.

MaxVio(c) = (max_i c[i] - mean(c)) / mean(c): how far the most loaded expert
is above perfect balance. MaxVio_batch uses one training step's counts,
MaxVio_global the counts summed over a whole evaluation set
(``RouterLoadRecorder``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """MaxVio over the last dimension; 0 where a row has no tokens at all.

    NaN where a row holds a non-finite count: such counts say nothing about
    balance, and 0.0 would read as perfect balance.
    """
    counts = counts.float()
    mean = counts.mean(dim=-1)
    excess = counts.amax(dim=-1) - mean
    vio = torch.where(mean > 0, excess / mean.clamp(min=1e-12), torch.zeros_like(mean))
    return torch.where(torch.isfinite(counts).all(dim=-1), vio, torch.full_like(vio, float("nan")))


def dead_expert_fraction(counts: torch.Tensor) -> torch.Tensor:
    """Fraction of experts that received no token, over the last dimension."""
    return (counts == 0).float().mean(dim=-1)


def summarize(per_layer_maxvio: list[float], biases: list[torch.Tensor], dead: list[float],
              prefix: str = "lossfree") -> dict[str, float]:
    """Aggregate scalars over all layers of this rank (any mix of expert counts)."""
    out: dict[str, float] = {}
    if per_layer_maxvio:
        out[f"{prefix}/maxvio_batch"] = sum(per_layer_maxvio) / len(per_layer_maxvio)
        out[f"{prefix}/maxvio_batch_max"] = max(per_layer_maxvio)
    if biases:
        flat = torch.cat([b.reshape(-1).float() for b in biases])
        out[f"{prefix}/bias_mean"] = flat.mean().item()
        out[f"{prefix}/bias_std"] = flat.std(unbiased=False).item()
        out[f"{prefix}/bias_min"] = flat.min().item()
        out[f"{prefix}/bias_max"] = flat.max().item()
    if dead:
        out[f"{prefix}/dead_expert_fraction"] = sum(dead) / len(dead)
    return out


class RouterLoadRecorder:
    """Records the token counts of any Megatron-Core router through forward hooks.

    Works for ``TopKRouter`` as well as ``LossFreeRouter``, so one measurement
    serves every balancing method (the demo compares them). Counts are the
    routing map after capacity dropping, i.e. what the experts received,
    minus padding tokens. Use it around an evaluation pass for MaxVio_global::

        with RouterLoadRecorder(model) as recorder:
            run_eval(model)
        maxvio_global = max_violation(recorder.counts(group)).mean()
    """

    def __init__(self, model_chunks, router_type: Optional[type] = None) -> None:
        if router_type is None:
            from megatron.core.transformer.moe.router import TopKRouter as router_type
        chunks = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)
        self.routers = [m for c in chunks for m in c.modules() if isinstance(m, router_type)]
        if not self.routers:
            raise ValueError("model_chunks: no router found to record")
        self._handles: list = []
        self._counts: list[Optional[torch.Tensor]] = [None] * len(self.routers)

    def _hook(self, index: int):
        def record(module, args, kwargs, output):
            routing_map_TE = output[1]
            padding_mask = kwargs.get("padding_mask", args[1] if len(args) > 1 else None)
            selected_TE = routing_map_TE.bool()
            if padding_mask is not None:
                selected_TE = selected_TE & ~padding_mask.reshape(-1, 1).bool()
            counts_E = selected_TE.sum(dim=0, dtype=torch.float64).detach()
            current = self._counts[index]
            self._counts[index] = counts_E if current is None else current + counts_E

        return record

    def __enter__(self) -> RouterLoadRecorder:
        for index, router in enumerate(self.routers):
            self._handles.append(
                router.register_forward_hook(self._hook(index), with_kwargs=True)
            )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        self._counts = [None] * len(self.routers)

    def counts(self, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
        """``[layers, E]`` float64 counts, summed over ``group`` when given."""
        if any(c is None for c in self._counts):
            raise RuntimeError("RouterLoadRecorder.counts: a router saw no forward pass")
        counts_LE = torch.stack(self._counts)  # type: ignore[arg-type]
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(counts_LE, group=group)
        return counts_LE
