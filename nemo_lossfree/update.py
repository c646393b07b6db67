"""The bias update as pure math: no communication, no module state.

Han & Zhong (2025, arXiv 2512.03915) read the expert bias as the dual variable
of the constraint "every expert receives the mean load"; one update is one dual
subgradient step. ``compute_bias_update`` is that step, ``scheduled_rate`` its
step size over time.
"""

from __future__ import annotations

import math

import torch

from nemo_lossfree.config import LossFreeConfig


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
        rule: "sign" (``b + u * sign(mean - c)``, the paper and Megatron-Core) or
            "proportional" (``b + u * (mean - c) / mean``: the same direction,
            scaled by the relative overload, so it settles instead of
            oscillating by +-u around balance).
        center: subtract each layer's mean bias afterwards. Top-K on ``s + b``
            does not change when every ``b[i]`` moves by the same constant, so
            this changes no routing decision; it stops the common-mode drift.

    With ``rule="sign", center=False`` the result is bit-identical to
    Megatron-Core's ``get_updated_expert_bias`` without its all-reduce: the
    mean is computed the same way (sum / E) for that reason.
    """
    if counts.shape != bias.shape:
        raise ValueError(f"counts and bias must have the same shape, got {counts.shape} and {bias.shape}")
    # Counts stay in their own precision: float64 counts (the balancer's
    # reduction) keep differences of one token visible past 2**24 tokens.
    if not counts.is_floating_point():
        counts = counts.double()
    mean = counts.sum(dim=-1, keepdim=True) / counts.shape[-1]
    offset = mean - counts
    if rule == "sign":
        step = torch.sign(offset) * rate
    elif rule == "proportional":
        # A layer with no tokens has mean 0: no information, no step.
        step = torch.where(mean > 0, offset / mean.clamp(min=1e-12), torch.zeros_like(offset)) * rate
    else:
        raise ValueError(f"rule: must be one of sign, proportional; got {rule!r}")
    updated = bias + step.to(bias.dtype)
    if center:
        updated = updated - updated.mean(dim=-1, keepdim=True)
    return updated


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
