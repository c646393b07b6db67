"""Which Megatron settings combine with loss-free balancing: every refusal and warning, once.

Each rule is one function with one wording. Its callers differ only in how
they name a setting, so every function takes ``spell`` (the field name as the
caller's user wrote it) and reads the settings from whatever the caller has:

- ``LossFreeRouter`` / ``LossFreeBalancer``: a ``TransformerConfig`` (``spell`` the identity);
- ``runconfig.validate``: the YAML ``model:`` section, a mapping (``yaml_key``: ``model.<field>``);
- ``integrations.megatron_lm``: Megatron-LM's parsed arguments (``flag``: ``--<field-with-dashes>``);
- ``integrations.bridge``: a Bridge ``GPTModelProvider`` (``yaml_key``).

No framework is imported here: the rules are about settings, not modules.
What a Hugging Face export target can carry is not a combination with
loss-free balancing (it holds for Megatron's own expert bias too) and lives
with the export: ``integrations.export.check_routing_exportable``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

Spell = Callable[[str], str]

#: Megatron balancing types that choose experts by other means than top-K on scores.
UNSUPPORTED_BALANCING = ("sinkhorn", "quantile_balancing")
#: Megatron balancing types that may stay on next to ours (auxiliary losses).
COMBINABLE_BALANCING = ("none", "aux_loss", "seq_aux_loss", "global_aux_loss")


def field_name(name: str) -> str:
    """Spell a field as Megatron-Core names it (``TransformerConfig``)."""
    return name


def yaml_key(name: str) -> str:
    """Spell a field as a run config names it (``model.<field>``)."""
    return f"model.{name}"


def flag(name: str) -> str:
    """Spell a field as Megatron-LM's command line names it (``--<field-with-dashes>``)."""
    return "--" + name.replace("_", "-")


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _set(config: Any, name: str, value: Any) -> None:
    if isinstance(config, MutableMapping):
        config[name] = value
    else:
        setattr(config, name, value)


def upstream_expert_bias_on(config: Any) -> bool:
    """Whether ``moe_router_enable_expert_bias`` is on: anything but plainly off (false, None, 0).

    Megatron-Core reads the flag by truthiness in ``finalize_model_grads``; a
    string such as "false" is truthy there, so only the plain off values count as off.
    """
    value = _get(config, "moe_router_enable_expert_bias", False)
    return not (value is None or (not isinstance(value, str) and value == 0))


def refuse_upstream_expert_bias(config: Any, user: str, spell: Spell = field_name) -> None:
    """Refuse Megatron-Core's own expert-bias update next to ours (no double update).

    The raw Megatron-Core API (``LossFreeRouter``, ``LossFreeBalancer``, a run
    config, Megatron-LM's flags) refuses; ``take_over_upstream_expert_bias`` is
    for frameworks whose recipes turn the flag on themselves.
    """
    if not upstream_expert_bias_on(config):
        return
    value = _get(config, "moe_router_enable_expert_bias")
    raise ValueError(
        f"{spell('moe_router_enable_expert_bias')}: must be false (or None, 0) with {user}, got "
        f"{value!r}; the loss-free balancer owns the expert-bias update (Megatron-Core's "
        "finalize_model_grads would apply a second one): turn it off and configure the update "
        "through LossFreeConfig"
    )


def take_over_upstream_expert_bias(config: Any, update_rate: float, spell: Spell = field_name) -> bool:
    """Turn Megatron-Core's expert-bias update off in favour of ours; True when it was on.

    For frameworks whose recipes turn the flag on themselves, before the model
    is built: Megatron-Bridge 0.6.2 sets it in the bridges of DeepSeek-V3 and
    V4, GLM-4.5 / 4.7-Flash / 5, Kimi (and Kimi-K2.5-VL), ERNIE-4.5 (and VL),
    MiniMax-M2 / M3, Nemotron-H, Bailing-MoE-V2, HY-V3 and MiMo-V2-Flash, in
    the providers of Sarvam, EXAONE-MoE, GLM-4.5V, Nemotron-VL / Omni, in the
    Nemotron-H / Nano recipes, and in Step-3.5 / 3.7 when the checkpoint's
    config asks for it. Enabling loss-free balancing there takes the bias over
    instead of failing:

    - Megatron's update is switched off (``finalize_model_grads`` no longer
      moves the bias: one update per step, ours);
    - the bias stays: ``LossFreeRouter`` registers the same persistent float32
      buffer, ``expert_bias``, so the checkpoint key
      (``decoder.layers.N.mlp.router.expert_bias``) and Bridge's Hugging Face
      mapping (``mlp.router.expert_bias`` <-> ``mlp.gate.e_score_correction_bias``)
      are unchanged, and a checkpoint of Megatron's ``TopKRouter`` loads into
      ``LossFreeRouter`` and back;
    - one warning line says so (a setting of the recipe was changed).

    ``config`` is a mapping (a run config's ``model:`` section) or an object
    with the ``TransformerConfig`` fields (a Bridge ``GPTModelProvider``);
    ``update_rate`` is the rate that applies from now on (``lossfree.update_rate``).
    The raw Megatron-Core API keeps refusing (``refuse_upstream_expert_bias``).
    """
    if not upstream_expert_bias_on(config):
        return False
    value = _get(config, "moe_router_enable_expert_bias")
    _set(config, "moe_router_enable_expert_bias", False)
    logger.warning(
        "%s: was %r (Megatron-Core's expert-bias update, rate %s), set to false: LossFreeRouter takes "
        "it over: the bias buffer and its checkpoint key mlp.router.expert_bias stay, updated once per "
        "global batch by LossFreeBalancer at lossfree.update_rate %s",
        spell("moe_router_enable_expert_bias"), value, _get(config, "moe_router_bias_update_rate"),
        update_rate,
    )
    return True


def balancing_types(config: Any) -> list[str]:
    """``moe_router_load_balancing_type`` as a list (Megatron accepts a string or a list)."""
    value = _get(config, "moe_router_load_balancing_type", "aux_loss")
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def refuse_unsupported_balancing(config: Any, spell: Spell = field_name) -> None:
    """Refuse balancing types that choose experts without top-K on scores (sinkhorn, quantile)."""
    bad = [t for t in balancing_types(config) if t in UNSUPPORTED_BALANCING]
    if bad:
        raise ValueError(
            f"{spell('moe_router_load_balancing_type')}: {bad[0]!r} selects experts without top-K "
            "on scores and cannot be combined with loss-free balancing; use "
            f"{', '.join(COMBINABLE_BALANCING)}"
        )


def require_moe(config: Any, spell: Spell = field_name) -> None:
    """Loss-free balancing needs routed experts."""
    if not _get(config, "num_moe_experts"):
        raise ValueError(
            f"{spell('num_moe_experts')}: lossfree.enabled needs an MoE model; set num_moe_experts"
        )


def aux_loss_warning(config: Any, spell: Spell = field_name) -> Optional[str]:
    """The line to warn with when an auxiliary loss is left on next to ours; None when it is off.

    Not an error: DeepSeek-V3 kept a tiny sequence-wise auxiliary loss next to
    its bias. The caller emits it (a ``warnings.warn``, a ``warning:`` line).
    """
    coeff = _get(config, "moe_aux_loss_coeff", 0.0)
    coeffs = coeff if isinstance(coeff, (list, tuple)) else [coeff]
    numbers = [c for c in coeffs if isinstance(c, (int, float)) and not isinstance(c, bool)]
    if not any(numbers):
        return None
    kinds = [t for t in balancing_types(config) if t != "none"]
    if not kinds:
        return (
            f"{spell('moe_aux_loss_coeff')}: is {coeff} with lossfree.enabled; it has no effect "
            "while moe_router_load_balancing_type is none, set 0 to say so"
        )
    kind = kinds[0] if len(kinds) == 1 else kinds
    return (
        f"{spell('moe_aux_loss_coeff')}: is {coeff} with lossfree.enabled (load balancing type "
        f"{kind!r}); the auxiliary loss fights the bias and its gradient interferes with the "
        "language-model loss; set 0 for the paper's method"
    )
