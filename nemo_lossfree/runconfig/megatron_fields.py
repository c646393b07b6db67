"""The keys a run config's ``model:`` section may hold: Megatron's own field names.

A ``model:`` key is a field of Megatron-Core's ``TransformerConfig`` (with its
base ``ModelParallelConfig``), of ``MLATransformerConfig`` (DeepSeek-style
attention, ``configs/deepseek-v3-1024gpu.yaml``), or of Megatron-Bridge's
``GPTModelProvider``, which our files complete. Anything else is a misspelling
that Bridge would skip with a warning and the demo worker would ignore.

The Megatron-Core names are ``dataclasses.fields`` of the installed classes
(imported with ``quiet``: Megatron's import-time warnings must not bury
the one line a problem gets). Megatron-Bridge is not a
dependency (the ``bridge`` extra), so its provider's own fields are listed here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import warnings
from typing import Iterator

#: The fields ``GPTModelProvider`` declares itself (Megatron-Bridge 0.6,
#: ``megatron/bridge/models/gpt_provider.py``; some redeclare ``TransformerConfig``'s).
#: ``transformer_layer_spec`` takes an import path through ``nemo_lossfree.integrations.bridge.pretrain``.
PROVIDER_FIELDS = frozenset({
    "fp16_lm_cross_entropy", "parallel_output", "share_embeddings_and_output_weights",
    "make_vocab_size_divisible_by", "position_embedding_type", "rotary_base", "rotary_percent",
    "seq_len_interpolation_factor", "seq_length", "attention_softmax_in_fp32",
    "deallocate_pipeline_outputs", "scatter_embedding_sequence_parallel", "tp_only_amax_red",
    "tp_comm_overlap_cfg", "use_transformer_engine_full_layer_spec",
    "use_transformer_engine_op_fuser", "transformer_layer_spec", "generation_config", "vocab_size",
    "should_pad_vocab", "mtp_enabled", "init_model_with_meta_device", "use_te_rng_tracker",
    "enable_cuda_graph", "masked_softmax_fusion", "cross_entropy_loss_fusion",
    "gradient_accumulation_fusion", "restore_modelopt_state",
})


#: torch's logger that prints "No CUDA runtime is found" when Megatron imports it.
_NOISY_LOGGERS = ("torch.utils.cpp_extension",)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Python warnings and torch's CUDA log line off, for Megatron's import and construction."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def config_classes():
    """``(TransformerConfig, MLATransformerConfig)`` of the installed Megatron-Core, imported quietly."""
    with quiet():
        from megatron.core.transformer.transformer_config import (
            MLATransformerConfig,
            TransformerConfig,
        )
    return TransformerConfig, MLATransformerConfig


def field_names(cls) -> frozenset[str]:
    """The public dataclass fields of a Megatron config class."""
    return frozenset(f.name for f in dataclasses.fields(cls) if not f.name.startswith("_"))


@functools.lru_cache(maxsize=1)
def model_keys() -> frozenset[str]:
    """Every known ``model:`` key: ``MLATransformerConfig``'s fields (a superset of
    ``TransformerConfig``'s) and the provider's."""
    _, mla = config_classes()
    return field_names(mla) | PROVIDER_FIELDS
