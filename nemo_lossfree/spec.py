"""Put LossFreeRouter into Megatron-Core layer, block and MTP specs (and build the GPT of one).

megatron-core describes an MoE MLP either as
``ModuleSpec(module=MoELayer, submodules=MoESubmodules(...))`` or as
``functools.partial(MoELayer, submodules=MoESubmodules(...))`` (0.16 and 0.17
build the first, 0.18 and later the second); both are handled. The input
spec is never modified: a rewritten copy is returned.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

from nemo_lossfree.router import LossFreeRouter


def _swap_router(submodules: MoESubmodules, router: type) -> MoESubmodules:
    current = submodules.router
    if isinstance(current, type) and issubclass(current, TopKRouter) and current is not TopKRouter:
        if not issubclass(current, LossFreeRouter) and current is not router:
            # InferenceTopKRouter and other special routers are not training routers.
            raise ValueError(
                f"MoESubmodules.router: {current.__name__} cannot be replaced by "
                f"{router.__name__}; only TopKRouter (the default) is"
            )
    return dataclasses.replace(submodules, router=router)


def _rewrite(node: Any, router: type, state: dict) -> Any:
    """Return ``node`` with every MoESubmodules' router replaced (recursive)."""
    if isinstance(node, MoESubmodules):
        state["count"] += 1
        return _swap_router(node, router)
    if isinstance(node, functools.partial):
        args = tuple(_rewrite(a, router, state) for a in node.args)
        keywords = {k: _rewrite(v, router, state) for k, v in node.keywords.items()}
        return functools.partial(node.func, *args, **keywords)
    if isinstance(node, ModuleSpec):
        new = copy.copy(node)
        new.submodules = _rewrite(node.submodules, router, state)
        new.params = {k: _rewrite(v, router, state) for k, v in (node.params or {}).items()}
        return new
    if isinstance(node, (list, tuple)):
        return type(node)(_rewrite(x, router, state) for x in node)
    if isinstance(node, dict):
        return {k: _rewrite(v, router, state) for k, v in node.items()}
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {
            f.name: _rewrite(getattr(node, f.name), router, state)
            for f in dataclasses.fields(node)
            if f.init
        }
        return dataclasses.replace(node, **changes)
    return node


def use_loss_free_router(spec: Any, router: type = LossFreeRouter, *, require_moe: bool = True) -> Any:
    """Return ``spec`` with LossFreeRouter in every MoE layer.

    Accepts a layer spec (``ModuleSpec`` of a TransformerLayer), a decoder
    block spec (``ModuleSpec`` or ``TransformerBlockSubmodules``), an MTP
    block spec, or a list of layer specs. Dense layers are left as they are.

    Raises ``ValueError`` when ``require_moe`` and no MoE layer was found (a
    dense model would silently train without balancing).
    """
    if not (isinstance(router, type) and issubclass(router, LossFreeRouter)):
        raise TypeError(f"router: must be LossFreeRouter or a subclass, got {router!r}")
    state = {"count": 0}
    rewritten = _rewrite(spec, router, state)
    if require_moe and state["count"] == 0:
        raise ValueError(
            "spec: no MoE layer (MoESubmodules) found; build the spec with num_experts set"
        )
    return rewritten

