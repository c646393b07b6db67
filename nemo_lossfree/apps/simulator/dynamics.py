"""The bias dynamics of one layer under one update strategy, and their scores.

One simulated step is what ``LossFreeBalancer.step()`` does for one layer
after one global batch: route the step's tokens with the current bias, count,
then ``update.apply_update(config, t, counts, b, state, histogram)`` (the
balancer's own update: schedule, rule, drift integral or adaptive gain).

Scores of a trace of ``MaxVio_batch`` values ``v_0 .. v_{T-1}``
(``nemo_lossfree.metrics.max_violation`` of each step's counts):

- cumulative regret ``R_T = sum_t v_t``: the total overload the run paid. A
  strategy that balances fast and then stays near the noise floor has a small
  R_T; one that is slow to balance, or oscillates because its steps are too
  large, pays at every step. (The primal-dual reading: v_t is the violation
  of the balance constraint at step t; a regret bound caps its sum.)
- steps to target: the first step t at which the mean of
  ``v_t .. v_{t+W-1}`` is <= the target (W = ``window``), None if never:
  a single lucky step does not count as balanced.
- steady MaxVio: the mean of v over the last 20% of the steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from nemo_lossfree.apps.simulator.environment import Environment
from nemo_lossfree.config import LossFreeConfig
from nemo_lossfree.metrics import max_violation
from nemo_lossfree.update import apply_update, histogram_counts, update_state


@dataclass
class Trace:
    """Per-step record of one simulated strategy."""

    name: str
    config: LossFreeConfig
    maxvio: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    bias_mean: list[float] = field(default_factory=list)
    bias_spread: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    #: CPU time of this process (not wall time: the machine may be shared).
    cpu_seconds: float = 0.0

    def regret(self) -> float:
        return float(sum(self.maxvio))

    def steps_to_target(self, target: float, window: int = 10) -> Optional[int]:
        values = torch.tensor(self.maxvio, dtype=torch.float64)
        window = max(1, min(window, values.numel()))
        means = values.unfold(0, window, 1).mean(dim=1)
        hits = (means <= target).nonzero()
        return int(hits[0]) if hits.numel() else None

    def steady_maxvio(self) -> float:
        tail = self.maxvio[-max(1, len(self.maxvio) // 5):]
        return float(sum(tail) / len(tail))

    def summary(self, target: float, window: int) -> dict:
        return {
            "name": self.name,
            "config": self.config.to_dict(),
            "cumulative_regret": self.regret(),
            "mean_maxvio": self.regret() / len(self.maxvio),
            "steps_to_target": self.steps_to_target(target, window),
            "steady_maxvio": self.steady_maxvio(),
            "final_bias_spread": self.bias_spread[-1],
            "final_bias_mean": self.bias_mean[-1],
        }


def simulate(env: Environment, config: LossFreeConfig, *, name: str = "",
             steps: Optional[int] = None) -> Trace:
    """Run ``steps`` (default: all of the environment's) balancer steps from a zero bias."""
    steps = env.steps if steps is None else steps
    if not 1 <= steps <= env.steps:
        raise ValueError(f"steps: must be between 1 and {env.steps}, got {steps}")
    trace = Trace(name=name or config.update_rule, config=config)
    bias_1E = torch.zeros(1, env.num_experts, dtype=torch.float32)  # fp32, as the router keeps it
    state = update_state(config, 1, env.num_experts)
    started, started_cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        histogram = None
        if config.update_rule == "quantile":
            histogram = env.histogram(step, bias_1E[0]).double()
            counts_E = histogram_counts(histogram)
        else:
            counts_E = env.counts(step, bias_1E[0])
        trace.maxvio.append(float(max_violation(counts_E)))
        bias_1E, state, rate_11 = apply_update(
            config, step, counts_E[None], bias_1E, state, None if histogram is None else histogram[None]
        )
        trace.rate.append(float(rate_11))
        bias_1E = bias_1E.float()
        bias_E = bias_1E[0]
        trace.bias_mean.append(float(bias_E.mean()))
        trace.bias_spread.append(float(bias_E.max() - bias_E.min()))
        trace.tokens += env.tokens_per_step[step]
    trace.seconds = time.perf_counter() - started
    trace.cpu_seconds = time.process_time() - started_cpu
    return trace
