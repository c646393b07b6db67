"""The four arms of the demo: one model, four ways to balance its experts.

Each arm is a set of ``TransformerConfig`` fields plus whether the model uses
``LossFreeRouter`` (and the balancer). Everything else (seed, data order,
initial weights, optimizer) is identical between arms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Megatron-Core's aux-loss coefficient for the aux_loss arm. 1e-2 is the value
# Megatron-LM's MoE examples and Switch/GShard-style recipes use; larger
# coefficients balance more and cost more language-modelling loss.
AUX_LOSS_COEFF = 1e-2
# Megatron-Core's built-in expert-bias rate (its default, the paper's u).
MEGATRON_BIAS_RATE = 1e-3


@dataclass(frozen=True)
class Arm:
    name: str
    description: str
    loss_free: bool = False
    config_fields: dict[str, Any] = field(default_factory=dict)


ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm(
            "loss_free",
            "LossFreeRouter + LossFreeBalancer (nemo_lossfree)",
            loss_free=True,
            config_fields=dict(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0),
        ),
        Arm(
            "aux_loss",
            f"Megatron-Core aux loss (coeff {AUX_LOSS_COEFF:g})",
            config_fields=dict(
                moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=AUX_LOSS_COEFF
            ),
        ),
        Arm(
            "megatron_bias",
            f"Megatron-Core moe_router_enable_expert_bias (u={MEGATRON_BIAS_RATE:g})",
            config_fields=dict(
                moe_router_load_balancing_type="none",
                moe_aux_loss_coeff=0.0,
                moe_router_enable_expert_bias=True,
                moe_router_bias_update_rate=MEGATRON_BIAS_RATE,
            ),
        ),
        Arm(
            "none",
            "no balancing",
            config_fields=dict(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0),
        ),
    )
}


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
