"""LossFreeConfig: every knob of auxiliary-loss-free load balancing, validated.

The config is deliberately framework-free (a plain dataclass) so that the same
object comes out of a YAML ``lossfree:`` section, a Megatron-LM argparse
namespace or Python code, and is checked in one place before any GPU time is
spent.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

UPDATE_RULES = ("quantile", "sign", "proportional")
#: ``update_rate`` when it is not given: each rule's rate means something else
#: (a fraction of the balancing move; bias units per step; bias units per
#: relative overload), so a rule chosen without a rate gets its own.
DEFAULT_RATES = {"quantile": 0.5, "sign": 1e-3, "proportional": 1e-2}
SCHEDULES = ("constant", "inverse_time", "cosine", "linear_warmup", "adaptive")


#: Spellings of true and false read from strings (YAML, key=value overrides).
_TRUE_STRINGS = ("true", "yes", "on", "1")
_FALSE_STRINGS = ("false", "no", "off", "0")


def _is_number(value: Any) -> bool:
    # numbers.Real takes numpy scalars (np.float32 is no float subclass) and not np.bool_.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plain_number(annotation: str, value: Any) -> Any:
    """A validated numpy (or other real) scalar as the plain Python float or int the field holds."""
    if annotation in ("float", "Optional[float]") and _is_number(value):
        return float(value)
    if annotation in ("int", "Optional[int]") and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _check_rate(name: str, value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")


def _check_steps(name: str, value: Any, *, optional: bool = False, minimum: int = 0) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or null" if optional else "")
        raise ValueError(f"{name}: must be {allowed}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(choices)}; got {value!r}")


def _coerce(annotation: str, value: Any) -> Any:
    """Turn command-line strings into the field's type.

    ``key=value`` overrides arrive as strings, and YAML 1.1 reads ``1e-3`` (no
    dot) as a string too; anything that does not parse is left for
    ``__post_init__`` to reject with the field's name.
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        if annotation in ("float", "Optional[float]"):
            if annotation.startswith("Optional") and text.lower() in ("none", "null", "~"):
                return None
            return float(text)
        if annotation in ("int", "Optional[int]"):
            if annotation.startswith("Optional") and text.lower() in ("none", "null", "~"):
                return None
            return int(text)
    except ValueError:
        return value
    if annotation == "bool" and text.lower() in _TRUE_STRINGS + _FALSE_STRINGS:
        return text.lower() in _TRUE_STRINGS
    return value


@dataclass
class LossFreeConfig:
    """Settings of the loss-free balancer (Wang et al. 2024, arXiv 2408.15664).

    After each global batch every MoE layer's bias moves by
    ``rate(step) * direction(counts)``; see ``nemo_lossfree.update``.

    Assigning a field re-validates the whole config (the checks relate
    fields), so a config that passed stays valid; a refused assignment
    changes nothing.
    """

    # Set once __post_init__ has validated the fields (an instance attribute, no field).
    _validated: ClassVar[bool] = False

    #: Turns the feature on where a framework config carries a ``lossfree:`` section.
    enabled: bool = True
    #: Step size u of the bias update; unset: the rule's own (DEFAULT_RATES).
    #: For "quantile" the fraction of the balancing move taken per step (0.5:
    #: the bias follows the mean of about the last two global batches); for
    #: "sign" bias units per step (the paper's 1e-3 for sigmoid scores). The
    #: default was chosen on a grid of settings it was not tuned for
    #: (docs/balancing.md).
    update_rate: Optional[float] = None
    #: "quantile" (default): b += u * d, d the move that balances this global
    #: batch (quantile balancing on the global batch's margin histogram;
    #: upstream's EMA e is u = 1 - e); step-size free: d is measured in score
    #: units from the scores themselves, whatever the expert count, top-k,
    #: score function or stage of training.
    #: "sign": b += u * sign(mean - c) (the paper, Megatron-Core);
    #: "proportional": b += u * (mean - c) / mean (a relative-error step).
    update_rule: str = "quantile"
    #: Re-center every layer's bias to mean zero after each update. Top-K on
    #: s + b is invariant to a common shift, so no routing decision changes.
    center: bool = True
    #: Step-size schedule over balancer steps; see ``update.scheduled_rate``.
    schedule: str = "constant"
    #: Linear ramp of the rate from u/warmup_steps to u over the first steps.
    warmup_steps: int = 0
    #: Time constant of the decaying schedules ("inverse_time", "cosine").
    decay_steps: int = 1000
    #: Floor of the decaying schedules.
    min_update_rate: float = 0.0
    #: Gain of the drift-tracking integral term; 0 (the default) is the paper's
    #: update. Each step's bias move becomes ``step + integral`` with
    #: ``integral = integral_decay * integral + integral_gain * step``: a leaky sum
    #: of past steps. While training moves the router's scores in one direction,
    #: a plain step leaves the load off by about drift / rate (a larger rate
    #: cuts that lag but follows the per-batch count noise more); the integral
    #: learns the drift from the steps' persistent sign and follows it, while
    #: noise, whose steps alternate, averages out of it. See docs/demo.md.
    integral_gain: float = 0.0
    #: Memory of the integral term, in [0, 1): about 1 / (1 - decay) steps. Slow
    #: errors are corrected ``1 + integral_gain / (1 - integral_decay)`` times
    #: faster than by the step alone; per-batch noise only ``1 + integral_gain``.
    integral_decay: float = 0.97
    #: Stop updating after this many steps (rate 0), as DeepSeek-V3 did for its
    #: last tokens; None never freezes.
    freeze_after_steps: Optional[int] = None
    #: Record metrics every this many balancer steps.
    log_every: int = 1

    def __setattr__(self, name: str, value: Any) -> None:
        if not self._validated or name not in _FIELD_TYPES:
            object.__setattr__(self, name, value)
            return
        checked = type(self)(**dict(self._values(), **{name: value}))  # raises naming the field
        object.__setattr__(self, name, getattr(checked, name))

    def _values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELD_TYPES}

    def __post_init__(self) -> None:
        self._check()  # on the values as given, so that messages quote them
        for name, annotation in _FIELD_TYPES.items():
            object.__setattr__(self, name, _plain_number(annotation, getattr(self, name)))
        object.__setattr__(self, "_validated", True)

    def _check(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"lossfree.enabled: must be true or false, got {self.enabled!r}")
        _check_choice("lossfree.update_rule", self.update_rule, UPDATE_RULES)
        if self.update_rate is None:
            object.__setattr__(self, "update_rate", DEFAULT_RATES[self.update_rule])
        _check_rate("lossfree.update_rate", self.update_rate)
        if self.update_rule == "quantile" and self.update_rate > 1:
            raise ValueError(
                "lossfree.update_rate: must be in [0, 1] with update_rule quantile (the fraction "
                f"of the quantile step taken), got {self.update_rate!r}"
            )
        if not isinstance(self.center, bool):
            raise ValueError(f"lossfree.center: must be true or false, got {self.center!r}")
        _check_choice("lossfree.schedule", self.schedule, SCHEDULES)
        _check_steps("lossfree.warmup_steps", self.warmup_steps)
        _check_steps("lossfree.decay_steps", self.decay_steps, minimum=1)
        _check_rate("lossfree.min_update_rate", self.min_update_rate)
        if self.min_update_rate > self.update_rate:
            raise ValueError(
                "lossfree.min_update_rate: must be <= lossfree.update_rate "
                f"({self.update_rate!r}), got {self.min_update_rate!r}"
            )
        _check_rate("lossfree.integral_gain", self.integral_gain)
        if not _is_number(self.integral_decay) or not 0 <= self.integral_decay < 1:
            raise ValueError(
                f"lossfree.integral_decay: must be a number in [0, 1), got {self.integral_decay!r}"
            )
        _check_steps("lossfree.freeze_after_steps", self.freeze_after_steps, optional=True)
        _check_steps("lossfree.log_every", self.log_every, minimum=1)
        if self.schedule == "adaptive" and self.update_rule != "quantile":
            raise ValueError(
                "lossfree.schedule: adaptive needs update_rule quantile (it filters the quantile "
                f"rule's balancing biases), got update_rule {self.update_rule!r}"
            )
        if self.schedule == "adaptive" and self.integral_gain:
            raise ValueError(
                "lossfree.integral_gain: must be 0 with schedule adaptive (the adaptive gain already "
                f"follows drift), got {self.integral_gain!r}"
            )
        if self.schedule == "linear_warmup" and self.warmup_steps == 0:
            raise ValueError(
                "lossfree.warmup_steps: must be >= 1 when lossfree.schedule is linear_warmup, got 0"
            )

    @classmethod
    def from_dict(cls, section: Optional[Mapping[str, Any]]) -> LossFreeConfig:
        """Build from a plain mapping such as a YAML ``lossfree:`` section.

        Unknown keys are errors (a typo must not silently fall back to a default).
        """
        section = dict(section or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - set(fields))
        if unknown:
            raise ValueError(
                f"lossfree.{unknown[0]}: unknown key; allowed keys are {', '.join(sorted(fields))}"
            )
        return cls(**{k: _coerce(fields[k].type, v) for k, v in section.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Field name -> annotation (a string: ``from __future__ import annotations``).
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(LossFreeConfig)}
