"""The arms of the demo: one model, several ways to balance its experts.

Each arm is a set of ``TransformerConfig`` fields plus whether the model uses
``LossFreeRouter`` (and the balancer). Everything else (seed, data order,
initial weights, optimizer) is identical between arms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

# Megatron-Core's aux-loss coefficients. An auxiliary loss trades language-
# modelling loss against balance, so one coefficient is one point of a
# frontier: the demo sweeps three (1e-2 is Megatron-LM's usual starting point
# and the GShard/Switch range; 1e-3 and 1e-1 bracket it).
AUX_LOSS_COEFFS = {"aux_loss_1e-3": 1e-3, "aux_loss": 1e-2, "aux_loss_1e-1": 1e-1}
# Megatron-Core's built-in expert-bias rate (its default, the paper's u).
MEGATRON_BIAS_RATE = 1e-3
# Megatron-Core's quantile balancing at its default EMA (0: each step's quantile replaces the bias).
MEGATRON_QB_EMA = 0.0


@dataclass(frozen=True)
class Arm:
    name: str
    description: str
    loss_free: bool = False
    config_fields: dict[str, Any] = field(default_factory=dict)
    #: The auxiliary-loss coefficient of an arm on the aux-loss frontier.
    aux_coeff: Optional[float] = None


NO_BALANCING = dict(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)

ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm(
            "loss_free",
            "LossFreeRouter + LossFreeBalancer (nemo_lossfree, default LossFreeConfig)",
            loss_free=True,
            config_fields=NO_BALANCING,
        ),
        *(
            Arm(
                name,
                f"Megatron-Core aux loss (coeff {coeff:g})",
                config_fields=dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=coeff),
                aux_coeff=coeff,
            )
            for name, coeff in AUX_LOSS_COEFFS.items()
        ),
        Arm(
            "megatron_bias",
            f"Megatron-Core moe_router_enable_expert_bias (u={MEGATRON_BIAS_RATE:g})",
            config_fields=dict(
                NO_BALANCING,
                moe_router_enable_expert_bias=True,
                moe_router_bias_update_rate=MEGATRON_BIAS_RATE,
            ),
        ),
        Arm(
            "megatron_qb",
            f"Megatron-Core quantile_balancing (EMA {MEGATRON_QB_EMA:g})",
            config_fields=dict(
                moe_router_load_balancing_type="quantile_balancing",
                moe_aux_loss_coeff=0.0,
                moe_router_quantile_balancing_ema=MEGATRON_QB_EMA,
            ),
        ),
        Arm("none", "no balancing", config_fields=NO_BALANCING),
    )
}
#: ``nemo-lossfree demo``'s arms: the aux-loss frontier, ours, and Megatron-Core's two built-ins.
DEFAULT_ARMS = ("loss_free", "aux_loss_1e-3", "aux_loss", "aux_loss_1e-1", "megatron_bias", "megatron_qb")
def parse_arms(text: str) -> list[str]:
    """``"loss_free,aux_loss"`` -> names, checked against ARMS, order kept."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"arms: empty; choose from {', '.join(ARMS)}")
    for name in names:
        if name not in ARMS:
            raise ValueError(f"arms: unknown arm {name!r}; choose from {', '.join(ARMS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"arms: {text!r} names an arm twice")
    return names
