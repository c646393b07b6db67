"""Take over a recipe's Megatron-Core expert bias when ``lossfree.enabled`` is set.

Megatron-Bridge 0.6.2 sets ``moe_router_enable_expert_bias=True`` (Megatron-Core's
own auxiliary-loss-free update) in the bridges of DeepSeek-V3 and V4, GLM-4.5,
GLM-4.7-Flash, GLM-5, Kimi (and Kimi-K2.5-VL), ERNIE-4.5 (and its VL model),
MiniMax-M2 and M3, Nemotron-H, Bailing-MoE-V2, HY-V3 and MiMo-V2-Flash; in the
providers of Sarvam, EXAONE-MoE, GLM-4.5V, Nemotron-VL and Nemotron-Omni; in
the Nemotron-H / Nemotron-Nano-V2 / Nemotron-3-Nano recipes; and in Step-3.5 /
3.7 when the checkpoint's config asks for it. Turning on ``lossfree.enabled``
for such a recipe replaces that update instead of failing:

- Megatron's update is switched off (``moe_router_enable_expert_bias=False``,
  so ``finalize_model_grads`` no longer moves the bias: one update per step,
  ours);
- the bias itself stays: ``LossFreeRouter`` registers the same persistent
  float32 buffer, ``expert_bias``, so the checkpoint key
  (``decoder.layers.N.mlp.router.expert_bias``) and Bridge's Hugging Face
  mapping (``mlp.router.expert_bias`` <-> ``mlp.gate.e_score_correction_bias``)
  are unchanged, and a checkpoint written by Megatron's ``TopKRouter`` loads
  into ``LossFreeRouter`` and back;
- one log line says so.

The raw Megatron-Core API keeps refusing: ``LossFreeRouter`` built from a
``TransformerConfig`` with the flag still set raises (see
``nemo_lossfree.router.refuse_upstream_expert_bias``). Only this integration,
which owns the provider before the model is built, takes over.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

#: The provider field Megatron-Core reads to run its own bias update.
UPSTREAM_FLAG = "moe_router_enable_expert_bias"


def take_over_expert_bias(model: Any, update_rate: float) -> bool:
    """Switch a Bridge model provider's own expert-bias update off; True when it was on.

    ``model`` is ``ConfigContainer.model`` (a ``GPTModelProvider`` or any
    object with the TransformerConfig fields). Logs one line when it acts.
    """
    if not getattr(model, UPSTREAM_FLAG, False):
        return False
    setattr(model, UPSTREAM_FLAG, False)
    upstream_rate = getattr(model, "moe_router_bias_update_rate", None)
    logger.warning(
        "lossfree: model.%s was True (Megatron-Core's expert-bias update, rate %s); "
        "LossFreeRouter takes it over: Megatron's update is off, the bias buffer and its "
        "checkpoint key mlp.router.expert_bias stay, lossfree.update_rate %s applies",
        UPSTREAM_FLAG, upstream_rate, update_rate,
    )
    return True
