"""Compare update rules and schedules; scan update rates and recommend one.

The strategies (all at the same base rate u):

- ``sign``: ``b += u * sign(mean - c)``, no re-centering (Megatron-Core's rule);
- ``centered``: the same, re-centered to mean zero each step (the default);
- ``proportional``: ``b += u * (mean - c) / mean``, re-centered;
- ``inverse_time``: ``centered`` with ``u / (1 + t / decay_steps)``;
- ``warmup``: ``centered`` ramped up over ``warmup_steps``;
- ``freeze``: ``centered`` frozen (rate 0) after ``freeze_after_steps``.

Recommendation: over a grid of rates, the one with the smallest cumulative
regret (sum of MaxVio_batch over the simulated steps, see ``dynamics``) for
the chosen rule, centering and schedule. Regret weighs both halves of the
trade-off: a small rate balances slowly (large early MaxVio), a large one
oscillates around balance (large late MaxVio). The horizon matters: a longer
run favours smaller rates, so simulate as many steps as the phase you tune.
"""

from __future__ import annotations

from typing import Sequence

from nemo_lossfree.config import LossFreeConfig
from nemo_lossfree.simulator.dynamics import Trace, simulate
from nemo_lossfree.simulator.environment import Environment

STRATEGIES = ("sign", "centered", "proportional", "inverse_time", "warmup", "freeze")
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
    }
    if name not in configs:
        raise ValueError(f"strategy: must be one of {', '.join(STRATEGIES)}; got {name!r}")
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


def recommend(traces: Sequence[Trace]) -> dict:
    """The rate of the trace with the smallest cumulative regret, and why."""
    if not traces:
        raise ValueError("rates: need at least one rate to choose from")
    best = min(traces, key=lambda t: t.regret())
    return {
        "update_rate": best.config.update_rate,
        "criterion": "smallest cumulative regret (sum of MaxVio_batch over the simulated steps)",
        "cumulative_regret": best.regret(),
        "steady_maxvio": best.steady_maxvio(),
    }
