"""Offline simulator of the expert-bias dynamics (``nemo-lossfree simulate``).

Routes synthetic or recorded router scores with a bias that is updated by
``nemo_lossfree.update`` exactly as ``LossFreeBalancer`` would, and compares
rules, schedules and rates on MaxVio_batch without training a model.
"""

from nemo_lossfree.apps.simulator.compare import (
    DEFAULT_RATES,
    STRATEGIES,
    compare_strategies,
    recommend,
    scan_rates,
    strategy_config,
)
from nemo_lossfree.apps.simulator.dynamics import Trace, simulate
from nemo_lossfree.apps.simulator.environment import Environment
from nemo_lossfree.apps.simulator.scores import RecordedPool, SyntheticPool, load_recorded
from nemo_lossfree.apps.simulator.topk_counts import CandidateTopK, reference_counts

__all__ = [
    "CandidateTopK", "DEFAULT_RATES", "Environment", "RecordedPool", "STRATEGIES", "SyntheticPool",
    "Trace", "compare_strategies", "load_recorded", "recommend", "reference_counts", "scan_rates",
    "simulate", "strategy_config",
]
