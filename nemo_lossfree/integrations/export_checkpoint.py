"""Export a Megatron-Bridge checkpoint on disk to Hugging Face, routing intact.

    nemo-lossfree export CHECKPOINT_DIR --hf-model deepseek-ai/DeepSeek-V3 --hf-path hf-export/

``CHECKPOINT_DIR`` is what a Bridge run saves (``checkpoint.save``: the
``iter_*`` folders, the newest is taken) or one ``iter_*`` folder. The
loading and the conversion are Megatron-Bridge's own
(``AutoBridge.load_megatron_model``: the model provider from the
checkpoint's ``run_config.yaml``, weights through ``dist_checkpointing``, on
the CPU with gloo, any training layout collapsed to one rank;
``AutoBridge.from_auto_config``: the Hugging Face config of the checkpoint's
architecture in the ``--hf-model`` family's format); what goes out is
``export.export_to_hf``'s (the target refusals, the bias shift).

Two entries of a loss-free run's ``run_config.yaml`` do not instantiate as
Bridge writes them, so Bridge's loader is given a view of the checkpoint (its
files linked, nothing copied or changed) whose run config fixes them:

- ``model.transformer_layer_spec`` is ``LossFreeLayerSpec`` around the
  recipe's spec. It is rebuilt, so the model has ``LossFreeRouter`` and the
  trained ``mlp.router.expert_bias`` loads (the run config says
  ``moe_router_enable_expert_bias: false``: Megatron's ``TopKRouter`` would
  have no buffer, and Bridge's loader skips checkpoint keys the model lacks,
  silently). Bridge's weight loader drops ``_extra_state``: the balancer's
  step counter is not needed to export. ``LossFreeLayerSpec`` records the spec it wraps
  (``to_cfg_dict``); a checkpoint written before it did names none, and then
  ``--layer-spec`` (the run's ``model.transformer_layer_spec``) is required.
  ``--layer-spec`` also replaces a recorded spec (e.g. Bridge's local spec on
  a machine without Transformer Engine).
- ``model.finalize_model_grads_func`` is the function Bridge's setup installs
  at every start; it is runtime state, not architecture: it is dropped.
  Checkpoints saved before the balancer's wrapper serialised as the function
  it wraps (``balancer.attach``) named the wrapper, which cannot be imported.

A checkpoint of a model trained with Megatron-Core's own expert bias
(``moe_router_enable_expert_bias``, ``TopKRouter``) exports the same way: the
bias buffer and its key are the same.

Megatron-LM checkpoints (no ``run_config.yaml``; arguments in
``common.pt``) are refused: Bridge builds their model from Megatron-LM's
arguments with Megatron-LM's layer spec, which has no place for ours.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from nemo_lossfree.integrations.export import ExportRefused

#: The file Bridge writes the ConfigContainer to in every checkpoint folder.
RUN_CONFIG = "run_config.yaml"
#: How ``LossFreeLayerSpec`` appears as a ``_target_`` in a run config.
LOSSFREE_SPEC_TARGET = "nemo_lossfree.integrations.bridge.LossFreeLayerSpec"
_ITERATION = re.compile(r"iter_(\d+)$")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*[.:][A-Za-z_]\w*$")


def iteration_dir(checkpoint_dir: Union[str, Path]) -> Path:
    """The folder holding one saved iteration: the newest ``iter_*`` in ``checkpoint_dir``, or itself.

    ``ExportRefused`` naming ``CHECKPOINT_DIR`` when there is none, or when it is
    a Megatron-LM checkpoint (no ``run_config.yaml``). Cheap: no imports.
    """
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise ExportRefused(f"CHECKPOINT_DIR: {path} is not a directory")
    iterations = [(int(m.group(1)), p) for p in path.iterdir()
                  if p.is_dir() and (m := _ITERATION.match(p.name))]
    if iterations:
        path = max(iterations)[1]
    if not (path / RUN_CONFIG).is_file():
        if (path / "common.pt").is_file() or any(path.glob("mp_rank_*")):
            raise ExportRefused(
                f"CHECKPOINT_DIR: {path} is a Megatron-LM checkpoint (no {RUN_CONFIG}); this command "
                "exports Megatron-Bridge checkpoints (the checkpoint.save folder of a Bridge run)"
            )
        raise ExportRefused(
            f"CHECKPOINT_DIR: {path} has no {RUN_CONFIG} and no iter_* folder: not a Megatron-Bridge checkpoint"
        )
    return path


def check_layer_spec(value: Optional[str]) -> None:
    """``--layer-spec`` has the shape of an import path (``pkg.mod:function`` or ``pkg.mod.function``)."""
    if value is not None and not _IMPORT_PATH.match(value):
        raise ExportRefused(f"--layer-spec: expected module:function or module.function, got {value!r}")


def _target(import_path: str) -> str:
    """``pkg.mod:fn`` -> ``pkg.mod.fn`` (a run config's ``_target_``)."""
    return import_path.replace(":", ".")


def _is_lossfree_spec(node: Any) -> bool:
    return isinstance(node, dict) and node.get("_target_") == LOSSFREE_SPEC_TARGET


def needs_layer_spec(model_section: dict) -> bool:
    """True when the run used ``LossFreeLayerSpec`` but the checkpoint does not say what it wrapped."""
    spec = model_section.get("transformer_layer_spec")
    return _is_lossfree_spec(spec) and spec.get("inner") is None


def loadable_model_section(model_section: dict, layer_spec: Optional[str] = None) -> dict:
    """A run config's ``model`` section that Bridge's loader can instantiate (see the module doc).

    Returns a new dict; ``model_section`` is left as it is.
    """
    section = dict(model_section)
    section["finalize_model_grads_func"] = None  # runtime: Bridge's setup installs it each run
    spec = section.get("transformer_layer_spec")
    if layer_spec is not None:
        chosen = {"_target_": _target(layer_spec), "_call_": False}
        section["transformer_layer_spec"] = (
            {"_target_": LOSSFREE_SPEC_TARGET, "inner": chosen} if _is_lossfree_spec(spec) else chosen
        )
    elif needs_layer_spec(section):
        raise ExportRefused(
            "--layer-spec: required for this checkpoint: its run config names LossFreeLayerSpec but not "
            "the layer spec it wrapped; pass the run's model.transformer_layer_spec as module:function"
        )
    return section


def check_recorded_layer_spec(section: dict) -> None:
    """Refuse, naming ``--layer-spec``, a recorded inner spec that Bridge's loader would not import.

    Bridge instantiates run configs only from allow-listed modules
    (``megatron.``, ``torch.``, ...), and a closure has no importable name.
    Naming the spec with ``--layer-spec`` is the user's statement that it is
    trusted code.
    """
    from megatron.training.config.instantiate_utils import target_allowlist

    spec = section.get("transformer_layer_spec")
    inner = spec.get("inner") if _is_lossfree_spec(spec) else None
    target = inner.get("_target_") if isinstance(inner, dict) else None
    if target is None:
        return
    if "<locals>" in target:
        raise ExportRefused(
            f"--layer-spec: the checkpoint's layer spec {target} was defined inside a function and cannot "
            "be imported; pass the run's model.transformer_layer_spec as module:function"
        )
    if not target_allowlist.is_allowed(target):
        raise ExportRefused(
            f"--layer-spec: the checkpoint's layer spec {target} is outside Megatron-Bridge's allowlist of "
            f"importable targets; pass --layer-spec {target} to load it (code you trust)"
        )


def _allow_targets(section: dict, layer_spec: Optional[str]) -> None:
    """Let Bridge's instantiation import our spec class and a ``--layer-spec`` the user named."""
    from megatron.bridge.utils.instantiate_utils import register_allowed_target_prefix

    if _is_lossfree_spec(section.get("transformer_layer_spec")):
        register_allowed_target_prefix("nemo_lossfree.")
    if layer_spec is not None:
        register_allowed_target_prefix(_target(layer_spec).rpartition(".")[0] + ".")


def _checkpoint_view(source: Path, view: Path, run_config: dict) -> Path:
    """``view``: every file of ``source`` linked, ``run_config.yaml`` replaced by ``run_config``."""
    import yaml

    view.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name != RUN_CONFIG:
            (view / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    (view / RUN_CONFIG).write_text(yaml.safe_dump(run_config, sort_keys=False))
    return view


def _resolve_layer_spec(import_path: str) -> Any:
    from nemo_lossfree.integrations.bridge.pretrain import import_object

    try:
        return import_object(import_path)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ExportRefused(f"--layer-spec: cannot import {import_path}: {exc}") from None


def export_checkpoint_to_hf(checkpoint_dir: Union[str, Path], hf_model: Union[str, Path],
                            hf_path: Union[str, Path], *, layer_spec: Optional[str] = None,
                            trust_remote_code: bool = False) -> Path:
    """Load a Bridge checkpoint on the CPU and save it as a Hugging Face checkpoint; returns the iteration folder.

    ``hf_model`` is the target family's Hugging Face model id or local
    folder (config and tokenizer; its weights are not read): Bridge's
    ``AutoBridge.from_auto_config`` writes the checkpoint's architecture in
    that family's config format and carries the tokenizer along. Raises ``ExportRefused`` (one line, naming
    the flag or the model field) for a bad checkpoint, spec or target.
    """
    from megatron.bridge import AutoBridge
    from megatron.bridge.training.model_load_save import temporary_distributed_context
    from megatron.bridge.training.utils.checkpoint_utils import read_run_config

    from nemo_lossfree.integrations.export import export_to_hf

    check_layer_spec(layer_spec)
    source = iteration_dir(checkpoint_dir)
    if layer_spec is not None:
        _resolve_layer_spec(layer_spec)  # fail here, in one line, not inside Bridge's instantiation
    run_config = read_run_config(str(source / RUN_CONFIG))
    run_config["model"] = loadable_model_section(run_config["model"], layer_spec)
    if layer_spec is None:
        check_recorded_layer_spec(run_config["model"])
    _allow_targets(run_config["model"], layer_spec)
    with tempfile.TemporaryDirectory(prefix="lossfree-export-") as tmp:
        view = _checkpoint_view(source, Path(tmp) / source.name, run_config)
        # Bridge's config-only export bridge: the Hugging Face config of the checkpoint's own
        # architecture, conformed to hf_model's (a small DeepSeek-V3-style model exports as
        # itself); hf_model's tokenizer and files go along; none of its weights are read.
        bridge = AutoBridge.from_auto_config(str(view), str(hf_model), trust_remote_code=trust_remote_code)
        with temporary_distributed_context(backend="gloo"):
            model = bridge.load_megatron_model(str(view), wrap_with_ddp=False)
            export_to_hf(model, bridge, hf_path)
    return source

