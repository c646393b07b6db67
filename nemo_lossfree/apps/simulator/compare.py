"""Compare update rules and schedules; scan update rates and recommend one.

The strategies (all at the same base rate u):

- ``sign``: ``b += u * sign(mean - c)``, no re-centering (Megatron-Core's rule);
- ``centered``: the same, re-centered to mean zero each step (the default);
- ``proportional``: ``b += u * (mean - c) / mean``, re-centered;
- ``inverse_time``: ``centered`` with ``u / (1 + t / decay_steps)``;
- ``warmup``: ``centered`` ramped up over ``warmup_steps``;
- ``freeze``: ``centered`` frozen (rate 0) after ``freeze_after_steps``;
- ``quantile``: quantile balancing on the step's margin histogram, re-centered,
  taking the fraction ``QUANTILE_FRACTION`` of the balancing move (the
  default ``LossFreeConfig``; step-size free, so ``rate`` does not apply).

Recommendation: over a grid of rates, for the chosen rule, centering and
schedule, the rates whose trace reaches the target (mean MaxVio_batch over a
window <= target) are preferred to those that never do, and among them the
one with the smallest cumulative regret (sum of MaxVio_batch over the
simulated steps, see ``dynamics``); when none reaches it, the smallest regret.
Regret weighs both halves of the trade-off: a small rate balances slowly
(large early MaxVio), a large one oscillates around balance (large late
MaxVio). The horizon matters: a longer run favours smaller rates, so simulate
as many steps as the phase you tune.
"""

from __future__ import annotations

from typing import Sequence

from nemo_lossfree.apps.simulator.dynamics import Trace, simulate
from nemo_lossfree.apps.simulator.environment import Environment
from nemo_lossfree.config import LossFreeConfig

STRATEGIES = ("sign", "centered", "proportional", "inverse_time", "warmup", "freeze", "quantile")
QUANTILE_FRACTION = 0.5
DEFAULT_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def strategy_config(name: str, *, rate: float, steps: int) -> LossFreeConfig:
    """The LossFreeConfig of a named strategy; schedule lengths scale with ``steps``."""
    tenth = max(1, steps // 10)
    configs = {
        "sign": dict(update_rule="sign", center=False),
        "centered": dict(update_rule="sign", center=True),
        "proportional": dict(update_rule="proportional", center=True),
        "inverse_time": dict(update_rule="sign", center=True, schedule="inverse_time", decay_steps=tenth),
        "warmup": dict(update_rule="sign", center=True, schedule="linear_warmup", warmup_steps=tenth),
        "freeze": dict(update_rule="sign", center=True, freeze_after_steps=max(1, steps // 2)),
        "quantile": dict(update_rule="quantile", center=True),
    }
    if name not in configs:
        raise ValueError(f"strategy: must be one of {', '.join(STRATEGIES)}; got {name!r}")
    if name == "quantile":
        rate = QUANTILE_FRACTION
    return LossFreeConfig(update_rate=rate, **configs[name])


def compare_strategies(env: Environment, names: Sequence[str], *, rate: float) -> list[Trace]:
    return [simulate(env, strategy_config(n, rate=rate, steps=env.steps), name=n) for n in names]


def scan_rates(env: Environment, rates: Sequence[float], *, base: LossFreeConfig) -> list[Trace]:
    """One trace per rate; everything else as in ``base``."""
    traces = []
    for rate in rates:
        config = LossFreeConfig.from_dict(dict(base.to_dict(), update_rate=rate,
                                               min_update_rate=min(base.min_update_rate, rate)))
        traces.append(simulate(env, config, name=f"rate={rate:g}"))
    return traces


def recommend(traces: Sequence[Trace], *, target: float, window: int = 10) -> dict:
    """The rate to use, and why: reaching ``target`` first, then the smallest regret."""
    if not traces:
        raise ValueError("rates: need at least one rate to choose from")
    reaching = [t for t in traces if t.steps_to_target(target, window) is not None]
    best = min(reaching or traces, key=lambda t: t.regret())
    criterion = "smallest cumulative regret (sum of MaxVio_batch over the simulated steps)"
    return {
        "update_rate": best.config.update_rate,
        "criterion": (f"reaches MaxVio_batch {target:g} (mean over {window} steps), then " + criterion
                      if reaching else f"no rate reaches MaxVio_batch {target:g}; " + criterion),
        "cumulative_regret": best.regret(),
        "steady_maxvio": best.steady_maxvio(),
        "steps_to_target": best.steps_to_target(target, window),
    }
