"""The bias update as pure math: no communication, no module state.

Han & Zhong (2025, arXiv 2512.03915) read the expert bias as the dual variable
of the constraint "every expert receives the mean load"; one update is one dual
subgradient step. ``compute_bias_update`` is that step, ``scheduled_rate`` its
step size over time, and ``compute_bias_update_with_integral`` adds a leaky
integral of past steps that follows a router whose scores drift.
"""

from __future__ import annotations

import math

import torch

from nemo_lossfree.config import LossFreeConfig


def rule_step(counts: torch.Tensor, *, rate: float, rule: str = "sign") -> torch.Tensor:
    """The rule's move of every bias for one batch's ``[..., E]`` counts.

    "sign": ``u * sign(mean - c)`` (the paper and Megatron-Core);
    "proportional": ``u * (mean - c) / mean``: the same direction, scaled by the
    relative overload, so it settles instead of oscillating by +-u around balance.
    The result keeps the counts' precision (float64 counts from the balancer's
    reduction keep differences of one token visible past 2**24 tokens).
    """
    if not counts.is_floating_point():
        counts = counts.double()
    # The mean as sum / E, as Megatron-Core computes it (bit-identical sign rule).
    mean = counts.sum(dim=-1, keepdim=True) / counts.shape[-1]
    offset = mean - counts
    if rule == "sign":
        return torch.sign(offset) * rate
    if rule == "proportional":
        # A layer with no tokens has mean 0: no information, no step.
        return torch.where(mean > 0, offset / mean.clamp(min=1e-12), torch.zeros_like(offset)) * rate
    raise ValueError(f"rule: must be one of sign, proportional; got {rule!r}")


def _centered(bias: torch.Tensor, center: bool) -> torch.Tensor:
    # Top-K on s + b does not change when every b[i] moves by the same
    # constant, so centering changes no routing decision; it stops the
    # common-mode drift.
    return bias - bias.mean(dim=-1, keepdim=True) if center else bias


def compute_bias_update(
    counts: torch.Tensor,
    bias: torch.Tensor,
    *,
    rate: float,
    rule: str = "sign",
    center: bool = False,
) -> torch.Tensor:
    """Return the bias after one update from the global token counts.

    Args:
        counts: ``[..., E]`` tokens routed to each expert over the global batch.
        bias: ``[..., E]`` current expert bias (float32).
        rate: step size u.
        rule: "sign" or "proportional" (see ``rule_step``).
        center: subtract each layer's mean bias afterwards.

    With ``rule="sign", center=False`` the result is bit-identical to
    Megatron-Core's ``get_updated_expert_bias`` without its all-reduce.
    """
    if counts.shape != bias.shape:
        raise ValueError(f"counts and bias must have the same shape, got {counts.shape} and {bias.shape}")
    step = rule_step(counts, rate=rate, rule=rule)
    return _centered(bias + step.to(bias.dtype), center)


def compute_bias_update_with_integral(
    counts: torch.Tensor,
    bias: torch.Tensor,
    integral: torch.Tensor,
    *,
    rate: float,
    rule: str = "sign",
    center: bool = False,
    gain: float,
    decay: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute_bias_update`` plus the drift-tracking integral term.

    ``integral <- decay * integral + gain * step`` and ``bias <- bias + step +
    integral`` (then centered), where ``step`` is the rule's move. Returns
    ``(bias, integral)``. The integral is a leaky sum of the steps: when the
    router's scores drift, the steps keep one sign and the integral grows
    until the bias moves with the drift; per-batch noise alternates in sign
    and mostly cancels in it. With ``gain == 0`` the bias equals
    ``compute_bias_update``'s bit for bit.
    """
    if not (counts.shape == bias.shape == integral.shape):
        raise ValueError(
            "counts, bias and integral must have the same shape, got "
            f"{counts.shape}, {bias.shape} and {integral.shape}"
        )
    step = rule_step(counts, rate=rate, rule=rule).to(bias.dtype)
    if gain == 0:
        return _centered(bias + step, center), integral
    integral = decay * integral + gain * step
    return _centered(bias + step + integral, center), integral


def scheduled_rate(config: LossFreeConfig, step: int) -> float:
    """Step size for balancer step ``step`` (0 for the first update).

    - constant: u.
    - inverse_time: ``u / (1 + t / decay_steps)``, the O(1/t) steps under which
      the primal-dual analysis gives logarithmic regret; large early (fast
      balancing from a random router), small late (little routing noise).
    - cosine: from u down to ``min_update_rate`` over ``decay_steps``.
    - linear_warmup: a ramp over ``warmup_steps``, then u.
    ``warmup_steps`` ramps every schedule (t counts from the end of warm-up),
    ``min_update_rate`` floors the decaying ones, and ``freeze_after_steps``
    sets the rate to 0 from that step on.
    """
    if step < 0:
        raise ValueError(f"step: must be >= 0, got {step}")
    if config.freeze_after_steps is not None and step >= config.freeze_after_steps:
        return 0.0
    u = config.update_rate
    if config.warmup_steps and step < config.warmup_steps:
        return u * (step + 1) / config.warmup_steps
    t = step - config.warmup_steps
    if config.schedule in ("constant", "linear_warmup"):
        return u
    if config.schedule == "inverse_time":
        rate = u / (1.0 + t / config.decay_steps)
    elif config.schedule == "cosine":
        progress = min(t, config.decay_steps) / config.decay_steps
        rate = config.min_update_rate + 0.5 * (u - config.min_update_rate) * (1 + math.cos(math.pi * progress))
    else:  # validated by LossFreeConfig
        raise ValueError(f"lossfree.schedule: unknown schedule {config.schedule!r}")
    return max(rate, config.min_update_rate)
