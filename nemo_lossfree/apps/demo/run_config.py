"""The demo's settings as a run config, and back: what the demo worker reads.

``nemo-lossfree demo`` writes its settings as a resolved run-config YAML
(``to_run_config``) and starts its workers on that file; ``nemo-lossfree
slurm`` hands a CPU job the resolved YAML of the user's run config. The
worker reads either through the one run-config loader, runs the check
``validate-config`` runs, and turns the config into ``DemoSettings`` here
(``from_run_config``), so what validates is what trains.

``KEYS`` maps every setting to its run-config key, both ways; the model's
layer counts and the batch split are derived (``moe_layer_freq``,
``global_batch_size``). The CPU model is fixed in other respects
(``model.CPU_MODEL_FIELDS``, local layer specs, expert parallelism only): a
``model:`` key is accepted only when it is what the demo's
``TransformerConfig`` holds for it, and refused naming it otherwise, never
dropped. Of the other Bridge sections the worker reads the keys in ``KEYS``
(a ``train``/``optimizer``/``scheduler``/``rng`` key beyond them is refused);
``dist``, ``ddp``, ``logger``, ``checkpoint`` and the rest are Bridge's run
settings (``nemo-lossfree slurm`` reads ``checkpoint`` for the job).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

from nemo_lossfree.apps.demo.settings import DemoSettings

#: DemoSettings field -> its run-config key.
KEYS = {
    "steps": "train.train_iters",
    "micro_batch_size": "train.micro_batch_size",
    "seed": "rng.seed",
    "experts": "model.num_moe_experts",
    "topk": "model.moe_router_topk",
    "hidden_size": "model.hidden_size",
    "num_attention_heads": "model.num_attention_heads",
    "moe_ffn_hidden_size": "model.moe_ffn_hidden_size",
    "score_function": "model.moe_router_score_function",
    "seq_length": "model.seq_length",
    "vocab_size": "model.vocab_size",
    "lr": "optimizer.lr",
    "min_lr": "optimizer.min_lr",
    "lr_warmup_steps": "scheduler.lr_warmup_iters",
    "lr_decay_steps": "scheduler.lr_decay_iters",
    "val_windows": "demo.val_windows",
    "val_micro_batch_size": "demo.val_micro_batch_size",
    "corpus": "demo.corpus",
    "corpus_max_bytes": "demo.corpus_max_bytes",
    "tokenizer": "demo.tokenizer",
}
#: Keys read besides KEYS: the derived ones and the worker's expert parallelism.
DERIVED = ("model.num_layers", "model.moe_layer_freq", "train.global_batch_size",
           "model.expert_model_parallel_size")
#: Sections whose every key the worker must understand.
STRICT_SECTIONS = ("model", "train", "optimizer", "scheduler", "rng", "demo")
#: Keys of strict sections the demo does not read but runs as stated (its optimizer: Adam, fp32).
DEMO_RUNS = {"optimizer.use_distributed_optimizer": False, "optimizer.bf16": False, "optimizer.fp16": False}
#: The demo's default expert parallelism and layout: one node, two CPU processes.
EXPERT_PARALLEL = 2
WORLD_SIZE = 2


def _get(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    section, _, key = dotted.partition(".")
    values = config.get(section) or {}
    return values.get(key, default) if isinstance(values, Mapping) else default


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    config.setdefault(section, {})[key] = value


def to_run_config(settings: DemoSettings, *, world_size: int = WORLD_SIZE,
                  expert_model_parallel_size: int = EXPERT_PARALLEL) -> dict[str, Any]:
    """The run config that trains ``settings`` (what ``nemo-lossfree demo`` hands its workers)."""
    from nemo_lossfree.apps.demo.model import CPU_MODEL_FIELDS, settings_fields

    config: dict[str, Any] = {
        "cluster": {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": world_size},
        "model": dict(settings_fields(settings), **CPU_MODEL_FIELDS,
                      expert_model_parallel_size=expert_model_parallel_size),
    }
    for name, key in KEYS.items():
        value = getattr(settings, name)
        if value is not None:
            _set(config, key, value)
    _set(config, "train.global_batch_size",
         settings.micro_batch_size * settings.num_micro_batches * world_size)
    config["lossfree"] = {"enabled": True, **settings.lossfree}
    return config


def world_size_of(config: Mapping[str, Any]) -> Optional[int]:
    cluster = config.get("cluster") or {}
    nodes, tasks = cluster.get("nodes"), cluster.get("tasks_per_node")
    return nodes * tasks if isinstance(nodes, int) and isinstance(tasks, int) else None


def arm_of(config: Mapping[str, Any]) -> str:
    """The demo arm a run config describes (a SLURM job runs one): its balancing keys."""
    from nemo_lossfree.apps.demo.arms import ARMS

    lossfree = config.get("lossfree")
    if lossfree is not None and lossfree.get("enabled", True):
        return "loss_free"
    model = config.get("model") or {}
    if model.get("moe_router_enable_expert_bias"):
        return "megatron_bias"
    kind = model.get("moe_router_load_balancing_type", "aux_loss")
    if kind == "quantile_balancing":
        return "megatron_qb"
    coeff = model.get("moe_aux_loss_coeff", 0.0) or 0.0
    if kind == "none" or not coeff:
        return "none"
    aux = [arm for arm in ARMS.values() if arm.aux_coeff is not None]
    # The arm of that coefficient; another is refused by from_run_config naming the key.
    return next((arm.name for arm in aux if arm.aux_coeff == coeff), "aux_loss")


def _layers(model: Mapping[str, Any]) -> dict[str, int]:
    """``num_layers`` (MoE layers) and ``dense_layers`` from Megatron's ``num_layers`` and ``moe_layer_freq``."""
    total = model.get("num_layers")
    freq = model.get("moe_layer_freq")
    if total is None:
        return {}
    if freq is None or freq == 1:
        return {"num_layers": total, "dense_layers": 0}
    pattern = list(freq) if isinstance(freq, (list, tuple)) else None
    dense = 0
    while pattern and dense < len(pattern) and pattern[dense] == 0:
        dense += 1
    if pattern is None or len(pattern) != total or any(p != 1 for p in pattern[dense:]):
        raise ValueError(
            f"model.moe_layer_freq: the CPU demo runs dense layers first, then MoE layers "
            f"([0] * dense + [1] * moe, {total} entries), got {freq!r}"
        )
    return {"num_layers": total - dense, "dense_layers": dense}


def from_run_config(config: Mapping[str, Any], arms: Sequence[str]) -> tuple[DemoSettings, int]:
    """``(settings, expert_model_parallel_size)`` for the run config; ``ValueError`` naming the key.

    Absent keys take ``DemoSettings``' defaults. Every ``model:`` key must be
    what the demo's ``TransformerConfig`` for each of ``arms`` holds.
    """
    values: dict[str, Any] = {}
    for name, key in KEYS.items():
        value = _get(config, key, dataclasses.MISSING)
        if value is not dataclasses.MISSING:
            values[name] = value
    model = config.get("model") or {}
    values.update(_layers(model))
    ep = model.get("expert_model_parallel_size") or 1  # Megatron's default, as validate-config reads it
    world = world_size_of(config) or WORLD_SIZE
    gbs = _get(config, "train.global_batch_size")
    if gbs is not None:
        mbs = values.get("micro_batch_size", DemoSettings.micro_batch_size)
        if not isinstance(gbs, int) or gbs % (mbs * world):
            raise ValueError(f"train.global_batch_size: must be a multiple of train.micro_batch_size x ranks "
                             f"({mbs} x {world}), got {gbs!r}")
        values["num_micro_batches"] = gbs // (mbs * world)
    lossfree = config.get("lossfree") or {}
    values["lossfree"] = {k: v for k, v in lossfree.items() if k != "enabled"}
    settings = DemoSettings(**values)
    _refuse_what_the_demo_does_not_run(config, settings, arms, ep)
    return settings, ep


def _refuse_what_the_demo_does_not_run(config: Mapping[str, Any], settings: DemoSettings,
                                       arms: Sequence[str], ep: int) -> None:
    from nemo_lossfree.apps.demo.arms import ARMS
    from nemo_lossfree.apps.demo.model import transformer_config

    read = set(KEYS.values()) | set(DERIVED) | set(DEMO_RUNS)
    for section in STRICT_SECTIONS:
        for key, value in (config.get(section) or {}).items():
            dotted = f"{section}.{key}"
            if dotted in DEMO_RUNS and value != DEMO_RUNS[dotted]:
                raise ValueError(f"{dotted}: the CPU demo runs {DEMO_RUNS[dotted]!r}, got {value!r}")
            if dotted in read or section == "model":
                continue
            raise ValueError(f"{dotted}: not a setting of the CPU demo worker (it reads "
                             f"{', '.join(sorted(k for k in read if k.startswith(section + '.')))}); remove it")
    model = config.get("model") or {}
    for arm in arms:
        try:
            runs = transformer_config(settings, ARMS[arm].config_fields, ep)
        except ValueError as exc:  # Megatron's own model rules, on the section as the demo runs it
            raise ValueError(f"{exc} (arm {arm})") from None
        for key, value in model.items():
            if f"model.{key}" in read:
                continue
            if not hasattr(runs, key):
                raise ValueError(f"model.{key}: not a setting of the CPU demo model; remove it or run on GPUs")
            held = getattr(runs, key)
            if held != value:
                raise ValueError(
                    f"model.{key}: the CPU demo's model runs {held!r} (arm {arm}), got {value!r}; "
                    "change it or run on GPUs"
                )
