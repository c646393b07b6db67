"""LossFreeBalancer: one all-reduce per global batch, then the bias update.

Every rank that holds a replica of a router (the expert-parallel ranks and the
data-, context- and tensor-parallel ranks around them: Megatron's TP x CP x DP
group, which contains EP) sums its routers' counts with the others, so all
replicas compute the same update from the same global counts and stay
bit-identical. Pipeline stages own different layers: no reduction across PP.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from nemo_lossfree import metrics as lf_metrics
from nemo_lossfree.config import LossFreeConfig
from nemo_lossfree.router import LossFreeRouter, refuse_upstream_expert_bias
from nemo_lossfree.update import apply_update, scheduled_rate, update_state

logger = logging.getLogger(__name__)


def find_routers(model_chunks: Iterable[torch.nn.Module]) -> list[LossFreeRouter]:
    """Every LossFreeRouter in the chunks (virtual-pipeline chunks, MTP layers), in order."""
    routers: list[LossFreeRouter] = []
    seen: set[int] = set()
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, LossFreeRouter) and id(module) not in seen:
                seen.add(id(module))
                routers.append(module)
    return routers


@functools.cache
def _placement(experts: int, ep_size: int) -> Optional[torch.Tensor]:
    """EP rank of each expert as Megatron-Core's MoELayer places them (one shared tensor); None for EP 1."""
    if ep_size == 1 or experts % ep_size:  # MoELayer asserts divisibility; nothing to place otherwise
        return None
    return lf_metrics.expert_ranks(experts, ep_size)


def layer_id(router: LossFreeRouter, index: int) -> int:
    """Megatron's global layer number (MTP layers after the decoder); else the index."""
    if router.layer_number is None:
        return index
    if router.is_mtp_layer:
        return router.layer_number + router.config.num_layers
    return router.layer_number


class LossFreeBalancer:
    """Reduces the routers' token counts and updates their biases.

    Args:
        model_chunks: a model or the list of model chunks (virtual pipeline).
        config: the update settings; defaults to ``LossFreeConfig()``.
        process_group: the router-replica group. Defaults to the routers' own
            ``tp_dp_cp_group`` (from their ``pg_collection``).

    Call ``step()`` once per global batch, after the last micro-batch's
    backward and before the optimizer step, or ``attach(transformer_config)``
    to have Megatron's ``finalize_model_grads_func`` call it.
    """

    def __init__(
        self,
        model_chunks: Union[torch.nn.Module, Sequence[torch.nn.Module]],
        config: Optional[LossFreeConfig] = None,
        process_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        chunks = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)
        self.routers = find_routers(chunks)
        if not self.routers:
            raise ValueError(
                "model_chunks: no LossFreeRouter found; build the model from a spec passed "
                "through nemo_lossfree.spec.use_loss_free_router"
            )
        self.config = config if config is not None else LossFreeConfig()
        if not isinstance(self.config, LossFreeConfig):
            raise TypeError(f"config: must be a LossFreeConfig, got {type(self.config).__name__}")
        for transformer_config in {id(r.config): r.config for r in self.routers}.values():
            refuse_upstream_expert_bias(transformer_config, "LossFreeBalancer")
        self.process_group = process_group if process_group is not None else self._router_group()
        self.steps_done = 0
        self.last_metrics: dict[str, float] = {}
        # What the update carries between steps, per router (update.update_state:
        # the drift integral, the adaptive gain). Balancer state, saved by
        # state_dict(), not model buffers: checkpoints without it still load.
        self.update_states = [update_state(self.config, 1, r.expert_bias.numel()) for r in self.routers]
        self._router_index = {id(r): j for j, r in enumerate(self.routers)}
        self._rates: list[torch.Tensor] = []
        self.uses_margins = self.config.update_rule == "quantile"
        for router in self.routers:
            router.balancer_attached = True
            router.record_margins = self.uses_margins
        # Megatron-Core's expert placement per router (None where EP is 1), for the EP-overload metric.
        self.placements = [_placement(r.expert_bias.numel(), getattr(r.config, "expert_model_parallel_size", 1) or 1)
                           for r in self.routers]
        #: ``(layer numbers, [E] counts)`` of the last logging step: the heatmap's input.
        self.last_loads: Optional[tuple[list[int], list[torch.Tensor]]] = None
        self._health_armed = False
        self._arm_health()

    def _router_group(self) -> Optional[dist.ProcessGroup]:
        groups = {id(r.tp_dp_cp_group): r.tp_dp_cp_group for r in self.routers}
        if len(groups) > 1:
            raise ValueError(
                "process_group: the routers carry different tp_dp_cp groups; pass the "
                "router-replica group explicitly"
            )
        return next(iter(groups.values()))

    # ------------------------------------------------------------------ step
    def current_rate(self) -> float:
        return scheduled_rate(self.config, self.steps_done)

    def _active(self) -> list[LossFreeRouter]:
        # Same rule as Megatron-Core: a router in eval mode (a distillation
        # teacher) or marked frozen keeps its bias.
        return [r for r in self.routers if r.training and not r.frozen_expert_bias]

    def reduce_counts(self, routers: Sequence[LossFreeRouter], with_health: bool = False) -> torch.Tensor:
        """Sum the routers' counts over the replica group: one collective, float64.

        float64 keeps counts exact past 2**24 tokens per expert (a large
        global batch summed over many ranks), where float32 would round. With
        the quantile rule the margin histograms travel in the same collective,
        after all counts; on logging steps the router-health sums after them.
        """
        parts = [r.local_tokens_per_expert for r in routers]
        if self.uses_margins:
            parts += [r.local_margin_histogram.reshape(-1) for r in routers]
        if with_health:
            parts += [r.local_health for r in routers]
        flat = torch.cat(parts).double()
        if dist.is_available() and dist.is_initialized():
            if self.process_group is None or dist.get_world_size(self.process_group) > 1:
                dist.all_reduce(flat, group=self.process_group)
        return flat

    @torch.no_grad()
    def step(self) -> dict[str, float]:
        """Apply one update from this global batch's counts; return metrics.

        Metrics (``lossfree/...``) are returned every ``config.log_every`` steps
        and are identical on all ranks of the replica group.

        Non-finite counts (or margin histograms) after the reduction drop the
        batch on every rank together: no bias or integral moves, the routers'
        counts and histograms are zeroed, ``steps_done`` does not advance (the
        schedule resumes where it was), one warning is logged and
        ``FloatingPointError`` is raised so the caller sees it. The next batch
        with finite counts updates normally: a caller that catches the error
        and carries on needs nothing else.
        """
        routers = self._active()
        if not routers:
            return {}
        log_now = self.steps_done % self.config.log_every == 0
        flat = self.reduce_counts(routers, with_health=log_now)
        if not torch.isfinite(flat).all():
            # Left in place, the NaNs would poison every later step too.
            self._clear(routers)
            logger.warning(
                "LossFreeBalancer: non-finite expert counts at step %d; the batch's counts were "
                "dropped and no expert bias moved", self.steps_done,
            )
            raise FloatingPointError(
                "LossFreeBalancer.step: non-finite expert counts after the all-reduce; "
                "refusing to update the expert bias"
            )
        rate = self.current_rate()
        # Split back per router, then group layers with the same expert count
        # so each group is one [L, E] update (models may mix expert counts).
        sizes = [r.local_tokens_per_expert.numel() for r in routers]
        hist_sizes = [r.local_margin_histogram.numel() for r in routers] if self.uses_margins else []
        health_sizes = [r.local_health.numel() for r in routers] if log_now else []
        pieces = list(torch.split(flat, sizes + hist_sizes + health_sizes))
        per_router = pieces[: len(sizes)]
        per_router_hist = [
            h.view(routers[i].local_margin_histogram.shape)
            for i, h in enumerate(pieces[len(sizes): len(sizes) + len(hist_sizes)])
        ]
        by_experts: OrderedDict[int, list[int]] = OrderedDict()
        for index, size in enumerate(sizes):
            by_experts.setdefault(size, []).append(index)
        result: dict[str, float] = {}
        if log_now:  # before the update: the biases that routed this step's tokens
            result.update(self._step_metrics(routers, per_router, pieces[len(sizes) + len(hist_sizes):]))
        for indices in by_experts.values():
            counts_LE = torch.stack([per_router[i] for i in indices])
            hist_LE2B = torch.stack([per_router_hist[i] for i in indices]) if self.uses_margins else None
            if rate > 0:
                self._update_biases([routers[i] for i in indices], counts_LE, hist_LE2B)
        self._clear(routers)
        if log_now:
            result.update(lf_metrics.bias_summary([r.expert_bias for r in routers]))
            result[lf_metrics.tag("update_rate")] = torch.cat(self._rates).mean().item() if self._rates else rate
            self.last_metrics = result
        self._rates = []
        self.steps_done += 1
        self._arm_health()
        return result

    def _step_metrics(self, routers: Sequence[LossFreeRouter], counts: Sequence[torch.Tensor],
                      health: Sequence[torch.Tensor]) -> dict[str, float]:
        """A logging step's load and router-health metrics (``metrics.step_metrics``); keeps the loads."""
        layer_ids = [layer_id(r, i) for i, r in enumerate(routers)]
        index = {id(r): j for j, r in enumerate(self.routers)}
        self.last_loads = (layer_ids, list(counts))
        return lf_metrics.step_metrics(
            layer_ids, counts, placements=[self.placements[index[id(r)]] for r in routers],
            biases=[r.expert_bias for r in routers], health=list(health) or None,
            topks=[r.topk for r in routers],
        )

    def _arm_health(self) -> None:
        """Have the routers record their health sums during the next step if it logs (only then)."""
        wanted = self.steps_done % self.config.log_every == 0
        if wanted != self._health_armed:
            for router in self.routers:
                router.record_health = wanted
            self._health_armed = wanted

    def _clear(self, routers: Sequence[LossFreeRouter]) -> None:
        """Start the routers' next global batch: zero counts and histograms."""
        torch._foreach_zero_([r.local_tokens_per_expert for r in routers])
        if self.uses_margins:
            torch._foreach_zero_([r.local_margin_histogram for r in routers])
        if self._health_armed:
            torch._foreach_zero_([r.local_health for r in routers])
        for router in routers:
            router.forwards_since_update = 0

    def _update_biases(self, routers: Sequence[LossFreeRouter], counts_LE: torch.Tensor,
                       hist_LE2B: Optional[torch.Tensor] = None) -> None:
        """One update of these routers' biases (same expert count) from their counts."""
        bias_LE = torch.stack([r.expert_bias for r in routers])
        slots = [self._router_index[id(r)] for r in routers]
        # The model may have moved since (Megatron-LM builds it on the CPU, then .cuda()).
        state = {key: torch.cat([self.update_states[j][key].to(bias_LE.device) for j in slots])
                 for key in self.update_states[slots[0]]}
        updated_LE, state, rate_L1 = apply_update(self.config, self.steps_done, counts_LE, bias_LE, state,
                                                  hist_LE2B)
        for n, j in enumerate(slots):
            self.update_states[j] = {key: value[n : n + 1] for key, value in state.items()}
        self._rates.append(rate_L1.reshape(-1))  # read on logging steps only (no host sync)
        torch._foreach_copy_([r.expert_bias for r in routers], list(updated_LE.unbind(0)))

    @property
    def integrals(self) -> list[torch.Tensor]:
        """Each router's drift integral ``[E]`` (zeros while ``integral_gain`` is 0)."""
        return [s["integral"][0] if "integral" in s else torch.zeros_like(r.expert_bias)
                for s, r in zip(self.update_states, self.routers)]

    # ---------------------------------------------------------- integration
    def attach(self, transformer_config: Any) -> LossFreeBalancer:
        """Run ``step()`` inside ``transformer_config.finalize_model_grads_func``.

        Megatron-Core's schedules, Megatron-LM's ``train()`` and
        Megatron-Bridge call that function once per global batch after the
        last backward, whatever the optimizer. If none is set yet, Megatron's
        own ``finalize_model_grads`` is wrapped (Megatron-LM keeps a function
        that is already set).
        """
        inner = getattr(transformer_config, "finalize_model_grads_func", None)
        if getattr(inner, "_lossfree_balancer", None) is self:
            return self
        if inner is None:
            from megatron.core.distributed.finalize_model_grads import finalize_model_grads

            inner = finalize_model_grads

        @functools.wraps(inner)
        def finalize_model_grads_with_lossfree(*args, **kwargs):
            out = inner(*args, **kwargs)
            self.step()
            return out

        finalize_model_grads_with_lossfree._lossfree_balancer = self  # type: ignore[attr-defined]
        transformer_config.finalize_model_grads_func = finalize_model_grads_with_lossfree
        return self

    # ----------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """What a resume needs beyond the model's ``expert_bias`` buffers."""
        state: dict[str, Any] = {"steps_done": self.steps_done, "config": self.config.to_dict()}
        if self.config.integral_gain > 0:
            state["integrals"] = [t.detach().cpu().clone() for t in self.integrals]
        if self.config.schedule == "adaptive":
            state["adaptive"] = [{k: s[k].detach().cpu().clone() for k in ("gain", "previous", "seen")}
                                 for s in self.update_states]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "steps_done" not in state:
            raise ValueError(
                "state['steps_done']: missing; expected a LossFreeBalancer.state_dict() "
                f"(keys steps_done, config, integrals), got keys {sorted(state)}"
            )
        self.steps_done = int(state["steps_done"])
        adaptive = state.get("adaptive")
        if adaptive is not None and self.config.schedule == "adaptive":
            if any(set(a) != {"gain", "previous", "seen"} for a in adaptive):
                # Saved by the earlier moment-estimate gain: its history means nothing to this one.
                logger.warning("LossFreeBalancer: the checkpoint's adaptive-gain state is of an older "
                               "format; the gain restarts from lossfree.update_rate")
            elif len(adaptive) != len(self.update_states) or any(
                a["previous"].shape != mine["previous"].shape for a, mine in zip(adaptive, self.update_states)
            ):
                raise ValueError("state['adaptive']: does not match this model's routers")
            else:
                for mine, saved in zip(self.update_states, adaptive):
                    mine.update({k: v.clone() for k, v in saved.items()})
        integrals = state.get("integrals")
        if integrals is not None and self.config.integral_gain > 0:
            shapes = [tuple(t.shape) for t in self.integrals]
            saved_shapes = [tuple(t.shape) for t in integrals]
            if saved_shapes != shapes:
                raise ValueError(
                    f"state['integrals']: shapes {saved_shapes} do not match this model's routers {shapes}"
                )
            for mine, saved in zip(self.update_states, integrals):
                mine["integral"] = saved.to(dtype=torch.float32).reshape(1, -1).clone()
        elif self.config.integral_gain > 0 and self.steps_done > 0:
            logger.warning(
                "LossFreeBalancer: the checkpoint has no integral term (saved with "
                "integral_gain 0 or by an older version); it restarts from zero"
            )
        saved = state.get("config")
        if saved is not None and saved != self.config.to_dict():
            logger.warning(
                "LossFreeBalancer: resuming with a config that differs from the checkpoint's "
                "(saved %s, now %s); the schedule continues from step %d",
                saved, self.config.to_dict(), self.steps_done,
            )


def warn_integral_restarts(balancer: LossFreeBalancer) -> None:
    """Say so when a resumed run (steps_done > 0) starts its drift integral from zero.

    Megatron-LM and Bridge checkpoints hold the biases (model buffers) and the
    iteration (the schedule's step), not the balancer's ``state_dict()``; the
    integral rebuilds itself within about ``1 / (1 - integral_decay)`` steps.
    """
    if balancer.config.integral_gain > 0 and balancer.steps_done > 0:
        logger.warning(
            "LossFreeBalancer: resuming at step %d with integral_gain %g; the drift integral "
            "is not in this checkpoint and restarts from zero (rebuilt in about %d steps)",
            balancer.steps_done, balancer.config.integral_gain,
            round(1 / (1 - balancer.config.integral_decay)),
        )
