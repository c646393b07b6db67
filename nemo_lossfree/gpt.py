"""The small rotary-embedding ``GPTModel`` the demo and the tests build from a layer spec.

Its own module, apart from ``spec.py``: building a model must not import
``LossFreeRouter`` (the patches' equivalence check builds upstream-only models
with it and asserts the plugin stays unimported).
"""

from __future__ import annotations

from typing import Any


def gpt_model(config, layer_spec: Any, *, vocab_size: int, max_sequence_length: int, **model_kwargs: Any):
    """Megatron-Core's ``GPTModel`` of ``layer_spec`` with rotary position embeddings: the small
    GPT-MoE of the demo (``apps/demo/model.py``) and of the tests (``testing/models.py``)."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        position_embedding_type="rope",
        **model_kwargs,
    )
