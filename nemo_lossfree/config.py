"""LossFreeConfig: every knob of auxiliary-loss-free load balancing, validated.

The config is deliberately framework-free (a plain dataclass) so that the same
object comes out of a YAML ``lossfree:`` section, a Megatron-LM argparse
namespace or Python code, and is checked in one place before any GPU time is
spent. It takes typed values and checks them: text is typed where it is read
(the run-config loader merges a YAML section into this dataclass with
OmegaConf; Megatron-LM's ``--lossfree-*`` flags are generated from its fields
by Megatron's ``ArgumentGroupFactory``, which types them by the annotations).
Each field's docstring is its ``--help`` text; ``argparse_meta`` metadata adds
what an annotation cannot say (the choices of a string field).
"""

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional

UPDATE_RULES = ("quantile", "sign", "proportional")
#: ``update_rate`` when it is not given: each rule's rate means something else
#: (a fraction of the balancing move; bias units per step; bias units per
#: relative overload), so a rule chosen without a rate gets its own.
DEFAULT_RATES = {"quantile": 0.5, "sign": 1e-3, "proportional": 1e-2}
SCHEDULES = ("constant", "inverse_time", "cosine", "linear_warmup", "adaptive")


def _is_number(value: Any) -> bool:
    # numbers.Real takes numpy scalars (np.float32 is no float subclass) and not np.bool_.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_nonnegative(name: str, value: Any) -> float:
    """A finite number >= 0, as a plain float (numpy scalars too); ``ValueError`` naming ``name``."""
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
    return float(value)


def check_integer(name: str, value: Any, *, optional: bool = False, minimum: int = 0) -> Optional[int]:
    """An integer >= minimum (or None when optional), as a plain int (numpy integers too);
    ``ValueError`` naming ``name``."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or null" if optional else "")
        raise ValueError(f"{name}: must be {allowed}, got {value!r}")
    return int(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(choices)}; got {value!r}")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: must be true or false, got {value!r}")
    return value


def _choices(default: str, choices: tuple[str, ...]) -> Any:
    """A string field with a fixed set of values (argparse's ``choices`` for the generated flag)."""
    return field(default=default, metadata={"argparse_meta": {"choices": choices}})


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

    enabled: bool = True
    """Turns the feature on where a framework config carries a ``lossfree:`` section."""
    update_rate: Optional[float] = None
    """Step size u of the bias update; unset: the rule's own (quantile 0.5, sign 1e-3,
    proportional 1e-2). For quantile the fraction of the balancing move taken per step (0.5: the
    bias follows the mean of about the last two global batches); for sign bias units per step (the
    paper's 1e-3 for sigmoid scores). The default was chosen on a grid of settings it was not
    tuned for (docs/balancing.md)."""
    update_rule: str = _choices("quantile", UPDATE_RULES)
    """quantile (default): b += u * d, d the move that balances this global batch (quantile
    balancing on the global batch's margin histogram; upstream's EMA e is u = 1 - e); step-size
    free: d is measured in score units from the scores themselves, whatever the expert count,
    top-k, score function or stage of training. sign: b += u * sign(mean - c) (the paper,
    Megatron-Core). proportional: b += u * (mean - c) / mean (a relative-error step)."""
    center: bool = True
    """Re-center every layer's bias to mean zero after each update. Top-K on s + b is invariant
    to a common shift, so no routing decision changes."""
    schedule: str = _choices("constant", SCHEDULES)
    """Step-size schedule over balancer steps; see update.scheduled_rate."""
    warmup_steps: int = 0
    """Linear ramp of the rate from u/warmup_steps to u over the first steps."""
    decay_steps: int = 1000
    """Time constant of the decaying schedules (inverse_time, cosine)."""
    min_update_rate: float = 0.0
    """Floor of the decaying schedules."""
    integral_gain: float = 0.0
    """Gain of the drift-tracking integral term; 0 (the default) is the paper's update. Each
    step's bias move becomes step + integral with integral = integral_decay * integral +
    integral_gain * step: a leaky sum of past steps. While training moves the router's scores in
    one direction, a plain step leaves the load off by about drift / rate (a larger rate cuts that
    lag but follows the per-batch count noise more); the integral learns the drift from the steps'
    persistent sign and follows it, while noise, whose steps alternate, averages out of it. See
    docs/demo.md."""
    integral_decay: float = 0.97
    """Memory of the integral term, in [0, 1): about 1 / (1 - decay) steps. Slow errors are
    corrected 1 + integral_gain / (1 - integral_decay) times faster than by the step alone;
    per-batch noise only 1 + integral_gain."""
    freeze_after_steps: Optional[int] = None
    """Stop updating after this many steps (rate 0), as DeepSeek-V3 did for its last tokens;
    unset never freezes."""
    log_every: int = 1
    """Record metrics every this many balancer steps."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not self._validated or name not in _FIELD_NAMES:
            object.__setattr__(self, name, value)
            return
        checked = type(self)(**dict(self._values(), **{name: value}))  # raises naming the field
        object.__setattr__(self, name, getattr(checked, name))

    def _values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELD_NAMES}

    def __post_init__(self) -> None:
        # Checked as given (messages quote the values), stored as plain Python
        # numbers (a numpy scalar becomes the float or int the field holds).
        for name, value in self._checked().items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_validated", True)

    def _checked(self) -> dict[str, Any]:
        """Every field's value, checked; raises ``ValueError`` naming the first bad one."""
        v: dict[str, Any] = {}
        v["enabled"] = _check_bool("lossfree.enabled", self.enabled)
        v["update_rule"] = _check_choice("lossfree.update_rule", self.update_rule, UPDATE_RULES)
        rate = DEFAULT_RATES[v["update_rule"]] if self.update_rate is None else self.update_rate
        v["update_rate"] = check_nonnegative("lossfree.update_rate", rate)
        if v["update_rule"] == "quantile" and v["update_rate"] > 1:
            raise ValueError(
                "lossfree.update_rate: must be in [0, 1] with update_rule quantile (the fraction "
                f"of the quantile step taken), got {rate!r}"
            )
        v["center"] = _check_bool("lossfree.center", self.center)
        v["schedule"] = _check_choice("lossfree.schedule", self.schedule, SCHEDULES)
        v["warmup_steps"] = check_integer("lossfree.warmup_steps", self.warmup_steps)
        v["decay_steps"] = check_integer("lossfree.decay_steps", self.decay_steps, minimum=1)
        v["min_update_rate"] = check_nonnegative("lossfree.min_update_rate", self.min_update_rate)
        if v["min_update_rate"] > v["update_rate"]:
            raise ValueError(
                "lossfree.min_update_rate: must be <= lossfree.update_rate "
                f"({rate!r}), got {self.min_update_rate!r}"
            )
        v["integral_gain"] = check_nonnegative("lossfree.integral_gain", self.integral_gain)
        if not _is_number(self.integral_decay) or not 0 <= self.integral_decay < 1:
            raise ValueError(
                f"lossfree.integral_decay: must be a number in [0, 1), got {self.integral_decay!r}"
            )
        v["integral_decay"] = float(self.integral_decay)
        v["freeze_after_steps"] = check_integer("lossfree.freeze_after_steps", self.freeze_after_steps,
                                               optional=True)
        v["log_every"] = check_integer("lossfree.log_every", self.log_every, minimum=1)
        if v["schedule"] == "adaptive" and v["update_rule"] != "quantile":
            raise ValueError(
                "lossfree.schedule: adaptive needs update_rule quantile (it filters the quantile "
                f"rule's balancing biases), got update_rule {self.update_rule!r}"
            )
        if v["schedule"] == "adaptive" and v["integral_gain"]:
            raise ValueError(
                "lossfree.integral_gain: must be 0 with schedule adaptive (the adaptive gain already "
                f"follows drift), got {self.integral_gain!r}"
            )
        if v["schedule"] == "linear_warmup" and v["warmup_steps"] == 0:
            raise ValueError(
                "lossfree.warmup_steps: must be >= 1 when lossfree.schedule is linear_warmup, got 0"
            )
        return v

    @classmethod
    def from_dict(cls, section: Optional[Mapping[str, Any]]) -> "LossFreeConfig":
        """Build from a plain mapping of typed values, such as a loaded ``lossfree:`` section.

        Unknown keys are errors (a typo must not silently fall back to a
        default). Values are not converted: text from YAML or a command line
        is typed by whoever reads it (``runconfig.load``, argparse).
        """
        section = dict(section or {})
        unknown = sorted(set(section) - set(_FIELD_NAMES))
        if unknown:
            raise ValueError(
                f"lossfree.{unknown[0]}: unknown key; allowed keys are {', '.join(sorted(_FIELD_NAMES))}"
            )
        return cls(**section)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(LossFreeConfig))
