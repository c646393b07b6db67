"""The keys a run config's ``model:`` section may hold, without importing Megatron.

A ``model:`` key is a field of Megatron-Core's ``TransformerConfig`` (with its
base ``ModelParallelConfig``), of ``MLATransformerConfig`` (DeepSeek-style
attention, ``configs/deepseek-v3-1024gpu.yaml``), or of Megatron-Bridge's
``GPTModelProvider``, which our files complete. Anything else is a misspelling
that Bridge would skip with a warning and the demo worker would ignore.

The Megatron-Core names are read from the installed package's source with
``ast``: importing it takes seconds and prints warnings, and
``validate-config`` must answer in a fraction of a second with nothing but its
own lines. ``tests/test_validate_config.py`` pins the result to the real
dataclass fields. Megatron-Bridge is not a dependency (the ``bridge`` extra),
so its provider's own fields are listed here.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path
from typing import Optional

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

# (file under megatron/, classes whose annotated class attributes are dataclass fields)
_SOURCES = (
    ("core/model_parallel_config.py", ("ModelParallelConfig",)),
    ("core/transformer/transformer_config.py", ("TransformerConfig", "MLATransformerConfig")),
)


def _class_fields(tree: ast.Module, name: str) -> set[str]:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return {
                stmt.target.id for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and "ClassVar" not in ast.unparse(stmt.annotation)
                and not stmt.target.id.startswith("_")
            }
    raise LookupError(name)


@functools.lru_cache(maxsize=1)
def model_keys() -> Optional[frozenset[str]]:
    """Every known ``model:`` key; None when Megatron-Core's sources are not found."""
    spec = importlib.util.find_spec("megatron")  # a namespace package: imports nothing
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    keys: set[str] = set(PROVIDER_FIELDS)
    for relative, classes in _SOURCES:
        source = next((root / relative for root in roots if (root / relative).is_file()), None)
        if source is None:
            return None
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"))
            for name in classes:
                keys |= _class_fields(tree, name)
        except (OSError, SyntaxError, LookupError):
            return None
    return frozenset(keys)
