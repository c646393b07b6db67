"""What differs between the Megatron-Core minors the plugin supports: one home.

The plugin supports megatron-core 0.16 (the first release whose
``MoESubmodules.router`` slot lets a layer spec choose the router class)
through 0.19. It is written against 0.19; every place where an older minor
lacks something is bridged here, and nowhere else. Each shim detects the
feature itself (a parameter, a field, an attribute), never the version
number, because NVIDIA containers ship development builds between releases.

- ``topk_routing_with_score_function(..., precomputed_indices=)`` (0.19):
  before it, ``gate_at_indices`` hands the chosen indices to upstream's
  gating through its ``router_replay`` hook (the same gates from the same code);
- ``moe_router_score_function="sqrtsoftplus"`` (0.18): refused in one line by
  ``check_router_config`` (older gating raises at the first forward);
- ``TopKRouter(..., is_mtp_layer=)`` (0.17): ``router_init_kwargs`` leaves it
  out and ``add_missing_router_attributes`` sets ``is_mtp_layer`` False (0.16
  numbers MTP layers after the decoder's, the global number 0.17+ computes);
- ``TopKRouter.frozen_expert_bias`` (0.19): ``add_missing_router_attributes``
  sets it False, so the balancer honours it as on 0.19 when a framework sets it;
- ``moe_utils.te_general_gemm`` (0.17 without Transformer Engine): 0.16 leaves
  the name undefined when TE is missing, so every router's gating raises
  NameError; defined None here at import, as 0.17 does (the torch path runs).

Features of Megatron-Core the plugin does not use but its tests compare
against (upstream's quantile balancing, 0.19; ``InferenceTopKRouter``, 0.17)
are listed in ``UPSTREAM_FEATURES`` so a test can say which minor lacks them.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import typing
from typing import Optional

import torch
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe import router as upstream_router
from megatron.core.transformer.transformer_config import TransformerConfig

#: The installed megatron-core release (the wheel's metadata; ``megatron.core.__version__``
#: appends the git hash of whatever directory Python runs in).
MEGATRON_CORE_VERSION = importlib.metadata.version("megatron-core")


def _score_functions() -> tuple[str, ...]:
    field = {f.name: f for f in dataclasses.fields(TransformerConfig)}["moe_router_score_function"]
    # A string annotation (postponed evaluation) has no args: the two every minor knows.
    return typing.get_args(field.type) or ("softmax", "sigmoid")


def _accepts(function, name: str) -> bool:
    return name in inspect.signature(function).parameters


#: Score functions this Megatron-Core's ``TransformerConfig`` and gating know.
SCORE_FUNCTIONS = _score_functions()
HAS_PRECOMPUTED_INDICES = _accepts(moe_utils.topk_routing_with_score_function, "precomputed_indices")
HAS_IS_MTP_LAYER = _accepts(upstream_router.TopKRouter.__init__, "is_mtp_layer")

if not hasattr(moe_utils, "te_general_gemm"):
    # megatron-core 0.16 without Transformer Engine: router_gating_linear reads
    # this name unconditionally; 0.17 defines it None when TE is missing.
    moe_utils.te_general_gemm = None

#: Upstream features the tests compare the plugin with: name -> (present here, first minor).
UPSTREAM_FEATURES = {
    "quantile_balancing": (hasattr(moe_utils, "qb_dual_update"), "0.19"),
    "InferenceTopKRouter": (hasattr(upstream_router, "InferenceTopKRouter"), "0.17"),
    "sqrtsoftplus": ("sqrtsoftplus" in SCORE_FUNCTIONS, "0.18"),
}


def missing_upstream_feature(name: str) -> Optional[str]:
    """None when this Megatron-Core has ``name`` (a key of ``UPSTREAM_FEATURES``), else why not."""
    present, since = UPSTREAM_FEATURES[name]
    if present:
        return None
    return f"megatron-core {MEGATRON_CORE_VERSION} has no {name} (new in {since})"


def check_router_config(config) -> None:
    """Refuse what this Megatron-Core cannot route, in one line, before any work.

    Megatron-Core before 0.18 types ``moe_router_score_function`` as a Literal
    but does not check it; "sqrtsoftplus" would pass the config and fail at the
    first forward inside upstream's gating.
    """
    score_function = config.moe_router_score_function
    if score_function not in SCORE_FUNCTIONS:
        since = f" ({score_function} needs megatron-core >= {UPSTREAM_FEATURES[score_function][1]})" \
            if score_function in UPSTREAM_FEATURES else ""
        raise ValueError(
            f"moe_router_score_function: must be one of {', '.join(SCORE_FUNCTIONS)} with "
            f"megatron-core {MEGATRON_CORE_VERSION}, got {score_function!r}{since}"
        )


def router_init_kwargs(is_mtp_layer: bool) -> dict:
    """``TopKRouter.__init__``'s keyword arguments beyond config and pg_collection."""
    if HAS_IS_MTP_LAYER:
        return {"is_mtp_layer": is_mtp_layer}
    return {}


def add_missing_router_attributes(router) -> None:
    """Give a router built by an older ``TopKRouter`` the attributes 0.19's has.

    ``frozen_expert_bias`` (0.19): Megatron-LM's ``--freeze-all-layers`` sets it
    and the balancer leaves such a router's bias alone; False until set.
    ``is_mtp_layer`` (0.17): False on 0.16, whose MTP layers already carry
    global layer numbers (after the decoder's), so the balancer's layer ids
    are the same as on 0.17+.
    """
    if not hasattr(router, "frozen_expert_bias"):
        router.frozen_expert_bias = False
    if not hasattr(router, "is_mtp_layer"):
        router.is_mtp_layer = False


class _GivenIndices:
    """A ``router_replay`` stand-in that makes upstream's top-K return chosen indices.

    ``topk_routing_with_score_function`` asks ``router_replay.get_replay_topk``
    for ``(values, indices)`` of whatever it would take the top-K of (logits,
    softmax or sigmoid scores). Returning those tensors' values at our indices
    is exactly what 0.19's ``precomputed_indices`` does, so every score
    function, pre-softmax, group and scaling option gates as upstream's own.
    """

    def __init__(self, top_indices_TK: torch.Tensor) -> None:
        self.top_indices_TK = top_indices_TK

    def get_replay_topk(self, scores_TE, topk, num_groups, group_topk, compute_topk):
        del topk, num_groups, group_topk, compute_topk  # the choice is made already
        return torch.gather(scores_TE, dim=1, index=self.top_indices_TK), self.top_indices_TK


def gate_at_indices(logits_TE: torch.Tensor, topk: int, top_indices_TK: torch.Tensor, *,
                    use_precomputed_indices: bool = HAS_PRECOMPUTED_INDICES, **gating):
    """Upstream's ``(probs_TE, routing_map_TE)`` for experts chosen by the caller.

    ``gating`` are ``topk_routing_with_score_function``'s keyword arguments
    (score function, pre-softmax, groups, scaling). On 0.19 this is upstream's
    ``precomputed_indices``; before, its ``router_replay`` hook carries the
    indices in. ``use_precomputed_indices=False`` forces the older path (tests
    compare the two on 0.19).
    """
    if use_precomputed_indices:
        return moe_utils.topk_routing_with_score_function(
            logits_TE, topk, precomputed_indices=top_indices_TK, **gating
        )
    return moe_utils.topk_routing_with_score_function(
        logits_TE, topk, router_replay=_GivenIndices(top_indices_TK), **gating
    )
