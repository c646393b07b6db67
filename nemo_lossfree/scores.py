"""Router scores ``s[t, i]`` from gate logits: the one home of the score functions.

The same functions as Megatron-Core's ``TopKRouter`` (``moe_router_score_function``),
unnormalised, in float32: what selection adds the bias to. ``LossFreeRouter``,
the simulator, the run-config check and the demo take them from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: ``moe_router_score_function`` values (Megatron-Core 0.19).
SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")


def check_score_function(name: object, key: str = "moe_router_score_function") -> None:
    """Refuse anything but a known score function, naming ``key``."""
    if name not in SCORE_FUNCTIONS:
        raise ValueError(f"{key}: must be one of {', '.join(SCORE_FUNCTIONS)}; got {name!r}")


def router_scores(logits_TE: torch.Tensor, score_function: str) -> torch.Tensor:
    """``[T, E]`` float32 scores: softmax over experts, sigmoid, or sqrt(softplus)."""
    # Imported here: the run-config check reads SCORE_FUNCTIONS before anything imports torch.
    import torch

    if score_function == "softmax":
        return torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    if score_function == "sigmoid":
        return torch.sigmoid(logits_TE.float())
    if score_function == "sqrtsoftplus":
        return torch.nn.functional.softplus(logits_TE.float()).sqrt()
    check_score_function(score_function)
    raise AssertionError(score_function)  # unreachable: check_score_function raised
