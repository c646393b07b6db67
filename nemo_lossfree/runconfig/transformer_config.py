"""Megatron-Core's ``TransformerConfig``, built on the CPU, as the judge of model rules.

Megatron's own model rules (attention heads and query groups against TP,
group-limited routing, expert bias and the score function, uneven pipeline
stages, precision, recompute, ...) are checked by constructing the dataclass,
never by copies of them: the installed Megatron-Core speaks for itself, and a
rule it adds is checked the day it is installed. ``build`` is the one place a
run config's model becomes a ``TransformerConfig``: ``validate-config`` (and
through it ``nemo-lossfree slurm`` and the demo worker) and the demo's model
(``apps/demo/model.py``) call it. Whatever Megatron raises (a ``ValueError``,
an ``assert``, a ``TypeError`` on a value of the wrong type) becomes one line
that names the YAML key: ``model.<key>: <Megatron's message>``, or, when the
message names no field, the section and the message in quotes.

Importing Megatron-Core takes seconds and prints warnings (Transformer Engine
and Apex missing, no CUDA runtime), and the construction warns about
deprecated defaults; ``megatron_fields.quiet`` keeps them off the terminal, so that a user's
mistake is the one line they see.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from nemo_lossfree.runconfig.megatron_fields import config_classes, field_names, quiet


def config_class(fields: Mapping[str, Any]):
    """``MLATransformerConfig`` with multi-latent attention (as Bridge's DeepSeek providers), else
    ``TransformerConfig``."""
    plain, mla = config_classes()
    return mla if fields.get("multi_latent_attention") else plain


def precision_fields(model: Mapping[str, Any]) -> dict[str, Any]:
    """``params_dtype`` and ``pipeline_dtype`` from the section's ``bf16``/``fp16``, as Megatron-LM
    derives them from its flags (``pipeline_dtype`` = ``params_dtype``); Megatron-Core refuses
    pipeline parallelism without a ``pipeline_dtype``. Keys the section sets itself win."""
    import torch

    dtype = torch.bfloat16 if model.get("bf16") else torch.float16 if model.get("fp16") else torch.float32
    return {key: dtype for key in ("params_dtype", "pipeline_dtype") if model.get(key) is None}


def model_fields(model: Mapping[str, Any]) -> dict[str, Any]:
    """The ``TransformerConfig`` fields of a run config's ``model:`` section: the keys that are
    fields of its class (provider-only keys such as ``seq_length`` are Bridge's), plus the
    precision the section implies."""
    known = field_names(config_class(model))
    fields = {key: value for key, value in model.items() if key in known}
    fields.update(precision_fields(model))
    return fields


def problem_line(exc: BaseException, cls, given: Mapping[str, Any], section: str = "model") -> str:
    """Megatron's error as one line naming the key: the first field its message names that
    ``given`` sets (else the first field it names); the section when it names none."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    names = field_names(cls)
    # Words of the message, flags (--moe-router-topk) read as field names.
    words = [w.strip("-").replace("-", "_") for w in re.findall(r"[A-Za-z-][A-Za-z0-9_-]*", message)]
    named = [w for w in words if w in names]
    key = next((w for w in named if w in given), named[0] if named else None)
    if key is not None:
        return f"{section}.{key}: {message}"
    return f'{section}: Megatron-Core\'s {cls.__name__} refuses it: "{message}"'


def build(fields: Mapping[str, Any], *, given: Optional[Mapping[str, Any]] = None, section: str = "model"):
    """``TransformerConfig(**fields)`` (``MLATransformerConfig`` with multi-latent attention),
    quietly; ``ValueError`` with one line naming the key of ``given`` (default: ``fields``)
    when Megatron-Core refuses them."""
    cls = config_class(fields)
    try:
        with quiet():
            return cls(**fields)
    except Exception as exc:  # noqa: BLE001 - any refusal of user input is one line, never a traceback
        raise ValueError(problem_line(exc, cls, fields if given is None else given, section)) from None


def check_model_section(model: Mapping[str, Any]) -> Optional[str]:
    """The one line Megatron-Core's refusal of the ``model:`` section gives, or None if it builds."""
    try:
        build(model_fields(model), given=model)
    except ValueError as exc:
        return str(exc)
    return None
