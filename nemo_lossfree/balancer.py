"""LossFreeBalancer: one all-reduce per global batch, then the bias update.

Every rank that holds a replica of a router (the expert-parallel ranks and the
data-, context- and tensor-parallel ranks around them: Megatron's TP x CP x DP
group, which contains EP) sums its routers' counts with the others, so all
replicas compute the same update from the same global counts and stay
bit-identical. Pipeline stages own different layers: no reduction across PP.

The balancer holds no state of its own that a resume needs: the biases, the
step counter and the update's state (drift integral, adaptive gain) are the
routers' buffers (``router.BALANCER_STATE_BUFFERS``), saved as each router's
``_extra_state``, so whatever checkpoints the model saves and restores them.

Host synchronisation: none on a step that records no metrics (the rate
schedule is host arithmetic on the host's step counter; every per-layer
decision, non-finite counts included, is a ``torch.where`` on the device).
A logging step (every ``config.log_every``) reads its metrics back in two
transfers: the per-layer load and router-health table (``metrics.step_metrics``),
then the bias statistics with the rate and the non-finite count.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from nemo_lossfree import metrics as lf_metrics
from nemo_lossfree.compat import refuse_upstream_expert_bias
from nemo_lossfree.config import LossFreeConfig
from nemo_lossfree.router import STATE_BUFFERS, STEPS_BUFFER, LossFreeRouter
from nemo_lossfree.update import apply_update, scheduled_rate, update_state_keys

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


@dataclass
class _Group:
    """Active routers with the same expert count: one ``[L, E]`` update."""

    experts: int
    counts: slice  # of the reduced flat tensor
    histograms: Optional[slice]
    biases: list[torch.Tensor]
    state: dict[str, list[torch.Tensor]]  # update-state key -> the routers' buffers
    layer_ids: list[int]
    placements: list[Optional[torch.Tensor]]  # EP rank per expert (None where EP is 1)
    topks: list[int]


@dataclass
class _Plan:
    """The tensors one step touches, looked up once (buffers, not module attributes).

    ``nn.Module.__getattr__`` costs about a microsecond per buffer and a step
    touches several per router; on 59 routers that alone was a third of the step.
    """

    routers: list[LossFreeRouter]
    parts: list[torch.Tensor]  # counts, then flattened histograms, in group order
    to_zero: list[torch.Tensor]
    health: list[torch.Tensor]  # after ``parts`` in the collective of a logging step, in group order
    groups: list[_Group] = field(default_factory=list)


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
        self.last_metrics: dict[str, float] = {}
        self.uses_margins = self.config.update_rule == "quantile"
        # The update-state keys this config reads and writes (router buffers).
        self._state_keys = update_state_keys(self.config)
        for router in self.routers:
            router.balancer_attached = True
            router.record_margins = self.uses_margins
        self._rates: list[torch.Tensor] = []
        # Steps whose reduced counts held a non-finite value since the last
        # logging step: a device tensor, read on logging steps only.
        self._non_finite: Optional[torch.Tensor] = None
        self._reduce_needed: Optional[bool] = None
        self._plans: dict[tuple[bool, ...], _Plan] = {}
        self._buffers_version = -1
        self._steps = 0
        self._step_buffers: list[torch.Tensor] = []
        self._state_restarted_pending = False
        # Megatron-Core's expert placement per router (None where EP is 1), for the EP-overload metric.
        self.placements = [_placement(r.expert_bias.numel(), getattr(r.config, "expert_model_parallel_size", 1) or 1)
                           for r in self.routers]
        #: ``(layer numbers, [E] counts)`` of the last logging step: the heatmap's input.
        self.last_loads: Optional[tuple[list[int], list[torch.Tensor]]] = None
        self._health_armed = False
        self._refresh()
        self._arm_health()

    def _router_group(self) -> Optional[dist.ProcessGroup]:
        groups = {id(r.tp_dp_cp_group): r.tp_dp_cp_group for r in self.routers}
        if len(groups) > 1:
            raise ValueError(
                "process_group: the routers carry different tp_dp_cp groups; pass the "
                "router-replica group explicitly"
            )
        return next(iter(groups.values()))

    # ------------------------------------------------------------ the state
    def _refresh(self) -> None:
        """After routers' buffers were replaced (load, device move): look them up and read the step.

        The step counter is every router's ``lossfree_steps``; they agree unless
        routers were added (a new MTP layer): the largest wins. One host read,
        only when ``LossFreeRouter.buffers_version`` changed.
        """
        if self._buffers_version == LossFreeRouter.buffers_version:
            return
        self._buffers_version = LossFreeRouter.buffers_version
        self._plans.clear()
        self._step_buffers = [r._buffers[STEPS_BUFFER] for r in self.routers]
        steps = torch.cat(self._step_buffers).tolist()
        self._steps = max(steps)
        if min(steps) != self._steps:
            self._write_steps(self._steps)
        if any(r.balancer_state_loaded is False for r in self.routers):
            self._state_restarted_pending = True  # said once, by whoever settles it first

    def _write_steps(self, steps: int) -> None:
        for buffer in self._step_buffers:
            buffer.fill_(steps)

    @property
    def steps_done(self) -> int:
        """Balancer steps so far (the rate schedule's position); the routers' ``lossfree_steps``."""
        self._refresh()
        return self._steps

    @steps_done.setter
    def steps_done(self, value: int) -> None:
        self._refresh()
        self._steps = int(value)
        self._write_steps(self._steps)

    def continue_from_iteration(self, iteration: int) -> None:
        """For frameworks that resume at a training iteration: fall back to it when the state is missing.

        A checkpoint that held the balancer state resumed it already (the
        routers' buffers); this does nothing then. One without it (saved by
        Megatron-Core's own expert bias, or before the state was in the
        model) continues the rate schedule from ``iteration`` (one balancer
        step per iteration), and a warning names what restarts from zero.
        """
        self._refresh()
        if iteration > 0 and not all(r.balancer_state_loaded for r in self.routers):
            self.steps_done = int(iteration)
            self._warn_state_restarted("the training iteration")

    def _settle_missing_state(self) -> None:
        """The routers' missing state was dealt with (restored, or its restart said): forget it."""
        self._state_restarted_pending = False
        for router in self.routers:
            if router.balancer_state_loaded is False:
                router.balancer_state_loaded = None

    def _warn_state_restarted(self, source: str = "the routers' own counter") -> None:
        self._settle_missing_state()
        restarted = {"integral": "the drift integral", "gain": "the adaptive gain"}
        what = [restarted[k] for k in self._state_keys if k in restarted]
        logger.warning(
            "LossFreeBalancer: the checkpoint holds no balancer state (saved by Megatron-Core's own "
            "expert bias or before the state was part of the model); the rate schedule continues "
            "from step %d (%s)%s",
            self._steps, source, "".join(f"; {w} restarts from zero" for w in what),
        )

    @property
    def integrals(self) -> list[torch.Tensor]:
        """Each router's drift integral ``[E]`` (zeros while ``integral_gain`` is 0)."""
        name = STATE_BUFFERS["integral"]
        return [r._buffers[name] for r in self.routers]

    # ------------------------------------------------------------------ step
    def current_rate(self) -> float:
        return scheduled_rate(self.config, self._steps)

    def _plan(self) -> Optional[_Plan]:
        """The active routers' tensors, grouped by expert count (cached per set of active routers).

        Same rule as Megatron-Core: a router in eval mode (a distillation
        teacher) or marked frozen keeps its bias.
        """
        active = tuple(r.training and not r.frozen_expert_bias for r in self.routers)
        plan = self._plans.get(active)
        if plan is None:
            routers = [r for r, on in zip(self.routers, active) if on]
            plan = self._plans[active] = self._build_plan(routers)
        return plan if plan.routers else None

    def _build_plan(self, routers: list[LossFreeRouter]) -> _Plan:
        by_experts: dict[int, list[int]] = {}
        for index, router in enumerate(routers):
            by_experts.setdefault(router._buffers["expert_bias"].numel(), []).append(index)
        ordered = [i for indices in by_experts.values() for i in indices]
        counts = [routers[i]._buffers["local_tokens_per_expert"] for i in ordered]
        histograms = ([routers[i]._buffers["local_margin_histogram"] for i in ordered]
                      if self.uses_margins else [])
        plan = _Plan(routers=routers, parts=counts + [h.view(-1) for h in histograms],
                     to_zero=counts + histograms,
                     health=[routers[i]._buffers["local_health"] for i in ordered])
        count_at, hist_at = 0, sum(c.numel() for c in counts)
        for experts, indices in by_experts.items():
            members = [routers[i] for i in indices]
            layers = len(members)
            hist_size = sum(r._buffers["local_margin_histogram"].numel() for r in members)
            plan.groups.append(_Group(
                experts=experts,
                counts=slice(count_at, count_at + layers * experts),
                histograms=slice(hist_at, hist_at + hist_size) if self.uses_margins else None,
                biases=[r._buffers["expert_bias"] for r in members],
                state={key: [r._buffers[STATE_BUFFERS[key]] for r in members] for key in self._state_keys},
                layer_ids=[layer_id(r, self.routers.index(r)) for r in members],
                placements=[self.placements[self.routers.index(r)] for r in members],
                topks=[r.topk for r in members],
            ))
            count_at += layers * experts
            hist_at += hist_size
        return plan

    def reduce_counts(self, plan: _Plan, with_health: bool = False) -> torch.Tensor:
        """Sum the routers' counts over the replica group: one collective, float64.

        float64 keeps counts exact past 2**24 tokens per expert (a large
        global batch summed over many ranks), where float32 would round. With
        the quantile rule the margin histograms travel in the same collective,
        after all counts; on logging steps the router-health sums after them.
        """
        flat = torch.cat(plan.parts + plan.health if with_health else plan.parts).double()
        if self._reduce_needed is None:
            self._reduce_needed = dist.is_available() and dist.is_initialized() and (
                self.process_group is None or dist.get_world_size(self.process_group) > 1)
        if self._reduce_needed:
            dist.all_reduce(flat, group=self.process_group)
        return flat

    @torch.no_grad()
    def step(self) -> dict[str, float]:
        """Apply one update from this global batch's counts; return metrics.

        Metrics (``lossfree/...``) are returned every ``config.log_every`` steps
        and are identical on all ranks of the replica group; other steps
        return ``{}`` and read nothing back from the device.

        Non-finite counts (or margin histograms) after the reduction never
        touch a bias: the layers that hold them keep their bias and update
        state (``update.usable_layers``, on the device, the same on every
        rank), the other layers update, the counts are zeroed as every step,
        and the step counts as a step of the schedule. Seeing them needs a
        host read, so they are reported on the next logging step (this one
        when it logs, always with the default ``log_every`` 1): one warning
        with the number of such steps, the metrics in ``last_metrics``, then
        ``FloatingPointError``. A caller that catches it and carries on needs
        nothing else.
        """
        self._refresh()
        plan = self._plan()
        if plan is None:
            return {}
        if self._state_restarted_pending:
            self._warn_state_restarted()
        rate = self.current_rate()
        log_now = self._steps % self.config.log_every == 0
        flat = self.reduce_counts(plan, with_health=log_now)
        # One reduction instead of an element-wise pass: a sum of counts is
        # finite exactly when every term is (they are far below float's range).
        bad = torch.isfinite(flat.sum()).logical_not()
        if self._non_finite is None or self._non_finite.device != flat.device:
            self._non_finite = torch.zeros((), dtype=torch.int64, device=flat.device)
        self._non_finite += bad
        # Before the update: the biases that routed this step's tokens.
        load_metrics = self._step_metrics(plan, flat) if log_now else None
        if rate > 0:
            for group in plan.groups:
                self._update_group(group, flat)
        self._clear(plan)
        torch._foreach_add_(self._step_buffers, 1)
        self._steps += 1
        self._arm_health()
        if load_metrics is None:
            self._rates = []
            return {}
        return self._log(plan, flat, rate, load_metrics)

    def _update_group(self, group: _Group, flat: torch.Tensor) -> None:
        """One ``[L, E]`` update of a group's biases and update state, written back in place."""
        layers = len(group.biases)
        counts_LE = flat[group.counts].view(layers, group.experts)
        hist_LE2B = None
        if group.histograms is not None:
            hist_LE2B = flat[group.histograms].view(layers, group.experts, 2, -1)
        bias_LE = torch.stack(group.biases)
        state = {key: torch.stack(buffers) for key, buffers in group.state.items()}
        updated_LE, state, rate_L1 = apply_update(self.config, self._steps, counts_LE, bias_LE, state, hist_LE2B)
        torch._foreach_copy_(group.biases, list(updated_LE.unbind(0)))
        for key, buffers in group.state.items():
            torch._foreach_copy_(buffers, list(state[key].unbind(0)))
        self._rates.append(rate_L1.reshape(-1))  # read on logging steps only

    def _clear(self, plan: _Plan) -> None:
        """Start the routers' next global batch: zero counts and histograms."""
        torch._foreach_zero_(plan.to_zero)
        if self._health_armed:
            torch._foreach_zero_(plan.health)
        for router in plan.routers:
            # A plain int attribute: nn.Module.__setattr__ would only add ~2 us per router.
            object.__setattr__(router, "forwards_since_update", 0)

    def _step_metrics(self, plan: _Plan, flat: torch.Tensor) -> dict[str, float]:
        """A logging step's load and router-health metrics (``metrics.step_metrics``); keeps the loads."""
        counts: list[torch.Tensor] = []
        for g in plan.groups:
            counts += list(flat[g.counts].view(len(g.biases), g.experts).unbind(0))
        health_at = sum(p.numel() for p in plan.parts)
        health = list(torch.split(flat[health_at:], [h.numel() for h in plan.health]))
        layer_ids = [i for g in plan.groups for i in g.layer_ids]
        self.last_loads = (layer_ids, counts)
        return lf_metrics.step_metrics(
            layer_ids, counts, placements=[p for g in plan.groups for p in g.placements],
            biases=[b for g in plan.groups for b in g.biases], health=health,
            topks=[k for g in plan.groups for k in g.topks],
        )

    def _arm_health(self) -> None:
        """Have the routers record their health sums during the next step if it logs (only then)."""
        wanted = self._steps % self.config.log_every == 0
        if wanted != self._health_armed:
            for router in self.routers:
                router.record_health = wanted
            self._health_armed = wanted

    def _log(self, plan: _Plan, flat: torch.Tensor, rate: float, result: dict[str, float]) -> dict[str, float]:
        """The logging step: the load metrics plus the biases, the rate and the non-finite count."""
        rates = torch.cat(self._rates).mean().reshape(1) if self._rates else flat.new_full((1,), rate)
        self._rates = []
        biases = lf_metrics.bias_statistics([b for g in plan.groups for b in g.biases]).double()
        *statistics, update_rate, non_finite = torch.cat(
            [biases, rates.double(), self._non_finite.double().reshape(1)]).tolist()
        self._non_finite.zero_()
        result.update({lf_metrics.tag(key): value for key, value in zip(lf_metrics.BIAS_STATISTICS, statistics)})
        result[lf_metrics.tag("update_rate")] = update_rate
        self.last_metrics = result
        if non_finite:
            logger.warning(
                "LossFreeBalancer: %d step(s) up to step %d reduced non-finite expert counts; the layers "
                "holding them kept their bias", int(non_finite), self._steps - 1,
            )
            raise FloatingPointError(
                f"LossFreeBalancer.step: non-finite expert counts after the all-reduce in {int(non_finite)} "
                "step(s) since the last logging step; the layers holding them kept their expert bias"
            )
        return result

    # ---------------------------------------------------------- integration
    def attach(self, transformer_config: Any,
               on_metrics: Optional[Callable[[dict[str, float]], None]] = None,
               resume_iteration: Optional[Callable[[], int]] = None) -> LossFreeBalancer:
        """Run ``step()`` inside ``transformer_config.finalize_model_grads_func``.

        Megatron-Core's schedules, Megatron-LM's ``train()`` and
        Megatron-Bridge call that function once per global batch after the
        last backward, whatever the optimizer. If none is set yet, Megatron's
        own ``finalize_model_grads`` is wrapped (Megatron-LM keeps a function
        that is already set). ``on_metrics`` gets the metrics of every
        logging step (a framework's writer). ``resume_iteration`` returns the
        framework's training iteration; it is read only on the first step
        after a load that lacked the balancer state (see
        ``continue_from_iteration``), since a framework may load its
        checkpoint after the balancer is attached. Attaching replaces the
        wrapper of any earlier ``LossFreeBalancer`` instead of stacking a
        second update.
        """
        inner = detach(transformer_config)
        if inner is None:
            from megatron.core.distributed.finalize_model_grads import finalize_model_grads

            inner = finalize_model_grads

        @functools.wraps(inner)
        def finalize_model_grads_with_lossfree(*args, **kwargs):
            out = inner(*args, **kwargs)
            if resume_iteration is not None:
                self._refresh()  # notes a load that lacked the state
                if self._state_restarted_pending:
                    self.continue_from_iteration(int(resume_iteration() or 0))
            metrics = self.step()
            if metrics and on_metrics is not None:
                on_metrics(metrics)
            return out

        finalize_model_grads_with_lossfree._lossfree_balancer = self  # type: ignore[attr-defined]
        # A framework that saves its config (Megatron-Bridge's run_config.yaml, through
        # Megatron's ConfigContainer) records the function this wraps: the wrapper is
        # runtime state re-installed at every start, and a closure cannot be loaded by name.
        finalize_model_grads_with_lossfree.to_cfg_dict = lambda: inner  # type: ignore[attr-defined]
        transformer_config.finalize_model_grads_func = finalize_model_grads_with_lossfree
        return self

    # ----------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """A copy of the balancer state the routers hold, for side files (the model's state dict has it).

        Keys: ``steps_done``, ``config``, and ``integrals`` (``integral_gain >
        0``) or ``adaptive`` (``schedule: adaptive``), as before the state
        moved into the model, so checkpoints that stored this still load.
        """
        state: dict[str, Any] = {"steps_done": self.steps_done, "config": self.config.to_dict()}
        if "integral" in self._state_keys:
            state["integrals"] = [t.detach().cpu().clone() for t in self.integrals]
        if "gain" in self._state_keys:
            state["adaptive"] = [{k: r._buffers[STATE_BUFFERS[k]].detach().cpu().clone().reshape(1, -1)
                                  for k in ("gain", "previous", "seen")} for r in self.routers]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Write a ``state_dict()`` (a side file's, or an older checkpoint's) into the routers."""
        if "steps_done" not in state:
            raise ValueError(
                "state['steps_done']: missing; expected a LossFreeBalancer.state_dict() "
                f"(keys steps_done, config, integrals), got keys {sorted(state)}"
            )
        self.steps_done = int(state["steps_done"])
        self._settle_missing_state()
        adaptive = state.get("adaptive")
        if adaptive is not None and "gain" in self._state_keys:
            if any(set(a) != {"gain", "previous", "seen"} for a in adaptive):
                # Saved by the earlier moment-estimate gain: its history means nothing to this one.
                logger.warning("LossFreeBalancer: the checkpoint's adaptive-gain state is of an older "
                               "format; the gain restarts from lossfree.update_rate")
            elif len(adaptive) != len(self.routers) or any(
                a["previous"].numel() != r.expert_bias.numel() for a, r in zip(adaptive, self.routers)
            ):
                raise ValueError("state['adaptive']: does not match this model's routers")
            else:
                for router, saved in zip(self.routers, adaptive):
                    for key, value in saved.items():
                        router._buffers[STATE_BUFFERS[key]].copy_(value.reshape(-1))
        integrals = state.get("integrals")
        if integrals is not None and "integral" in self._state_keys:
            shapes = [tuple(t.shape) for t in self.integrals]
            saved_shapes = [tuple(t.shape) for t in integrals]
            if saved_shapes != shapes:
                raise ValueError(
                    f"state['integrals']: shapes {saved_shapes} do not match this model's routers {shapes}"
                )
            for mine, saved in zip(self.integrals, integrals):
                mine.copy_(saved)
        elif "integral" in self._state_keys and self._steps > 0:
            logger.warning(
                "LossFreeBalancer: the checkpoint has no integral term (saved with "
                "integral_gain 0 or by an older version); it restarts from zero"
            )
        saved = state.get("config")
        if saved is not None and saved != self.config.to_dict():
            logger.warning(
                "LossFreeBalancer: resuming with a config that differs from the checkpoint's "
                "(saved %s, now %s); the schedule continues from step %d",
                saved, self.config.to_dict(), self._steps,
            )


def detach(transformer_config: Any) -> Optional[Callable]:
    """Remove any ``LossFreeBalancer.attach`` wrapper from ``finalize_model_grads_func``; return what is left."""
    func = getattr(transformer_config, "finalize_model_grads_func", None)
    while getattr(func, "_lossfree_balancer", None) is not None:
        func = func.__wrapped__
    if transformer_config is not None and hasattr(transformer_config, "finalize_model_grads_func"):
        transformer_config.finalize_model_grads_func = func
    return func
