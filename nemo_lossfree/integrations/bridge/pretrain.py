"""Pretrain through Megatron-Bridge with the ``lossfree`` flag.

    python -m nemo_lossfree.integrations.bridge.pretrain --recipe RECIPE --config-file configs/X.yaml \\
        [key=value ...]

(under ``torchrun`` for more than one process). RECIPE is a function name in
``megatron.bridge.recipes`` (``qwen3_30b_a3b_pretrain_config``) or
``module:function`` returning a ``ConfigContainer``.

Order, as Bridge's own ``run_recipe.py`` plus the flag: recipe -> the YAML
file and overrides (Bridge's ``process_config_with_overrides``) -> our flag
(``nemo_lossfree.integrations.bridge.enable_lossfree``, after the overrides
because Bridge restores callable fields) -> ``pretrain(config, forward_step,
callbacks=[...])``. Bridge's ``run_recipe.py`` takes no callbacks or layer
spec hooks, hence this script.

Our YAML sections (``cluster``, ``lossfree``) are taken out before Bridge sees
the file. Callable model fields cannot come through YAML in Bridge; here
``model.transformer_layer_spec`` may name one by import path
(``megatron.bridge.models.gpt_provider.local_layer_spec``, or ``pkg.mod:fn``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import tempfile
from typing import Any, Callable, Optional, Sequence

from nemo_lossfree.exit_codes import EXIT_USAGE
from nemo_lossfree.runconfig.load import (
    RunConfigError,
    load_run_config,
    save_run_config,
    split_sections,
)

DEFAULT_FORWARD_STEP = "megatron.bridge.training.gpt_step:forward_step"
#: pyproject.toml's ``bridge`` extra.
BRIDGE_REQUIREMENT = "megatron-bridge>=0.6,<0.7"


def bridge_missing() -> Optional[str]:
    """The one line to print when Megatron-Bridge is not installed; None when it is.

    Bridge is an optional extra (it needs Transformer Engine, so an NVIDIA
    container): without it the first Bridge import deep in ``build_config``
    would be a traceback, after the config was checked.
    """
    try:
        found = importlib.util.find_spec("megatron.bridge") is not None
    except ValueError:  # in sys.modules without a __spec__ (a stand-in): importable
        found = True
    except ImportError:
        found = False
    if found:
        return None
    return ("megatron.bridge: not installed; this entry point needs Megatron-Bridge 0.6: "
            f"pip install 'nemo-lossfree[bridge]' ({BRIDGE_REQUIREMENT}; it needs Transformer Engine, "
            "so use an NVIDIA NeMo container)")


def import_object(path: str) -> Any:
    """``pkg.mod:attr`` or ``pkg.mod.attr`` -> the object."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{path}: expected module:function or module.function")
    return getattr(importlib.import_module(module_name), attr)


def load_recipe(name: str) -> Callable[..., Any]:
    if ":" in name:
        return import_object(name)
    import megatron.bridge.recipes as recipes

    try:
        return getattr(recipes, name)
    except AttributeError:
        raise ValueError(
            f"--recipe: {name!r} is not in megatron.bridge.recipes; give a recipe function name "
            "or module:function"
        ) from None


def build_config(recipe: str, merged: dict):
    """``(ConfigContainer, lossfree_section)``: the recipe with the merged run config applied."""
    from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides

    bridge_part, _cluster, lossfree = split_sections(merged)
    model = bridge_part.get("model") or {}
    spec_path = model.pop("transformer_layer_spec", None)
    # Our files state the sequence length once (model.seq_length); Bridge
    # asserts that the dataset's matches.
    if model.get("seq_length") is not None and "seq_length" not in (bridge_part.get("dataset") or {}):
        bridge_part.setdefault("dataset", {})["seq_length"] = model["seq_length"]
    config = load_recipe(recipe)()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "overrides.yaml")
        save_run_config(bridge_part, path)
        config = process_config_with_overrides(config, config_filepath=path)
    if spec_path is not None:
        config.model.transformer_layer_spec = import_object(str(spec_path))
    return config, lossfree


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nemo_lossfree.integrations.bridge.pretrain",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True,
                        help="recipe function in megatron.bridge.recipes, or module:function")
    parser.add_argument("--config-file", help="YAML run config (configs/*.yaml)")
    parser.add_argument("--forward-step", default=DEFAULT_FORWARD_STEP,
                        help=f"forward step function (default {DEFAULT_FORWARD_STEP})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides, e.g. lossfree.enabled=true train.train_iters=10")
    args = parser.parse_args(argv)

    try:
        merged = load_run_config(args.config_file, args.overrides, flag="--config-file")
    except RunConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from nemo_lossfree.integrations.bridge import lossfree_config

    try:
        lossfree_config(merged.get("lossfree"))  # fail fast, before importing Bridge
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    missing = bridge_missing()
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return EXIT_USAGE
    if (merged.get("cluster") or {}).get("gpus_per_node") == 0:
        # The config is laid out for CPU processes (gloo): shim Megatron-Core's
        # CUDA-only calls before anything imports its transformer modules.
        from nemo_lossfree.integrations import cpu

        cpu.enable()

    from nemo_lossfree.integrations.bridge import enable_lossfree

    try:
        config, lossfree = build_config(args.recipe, merged)
        callback = enable_lossfree(config, lossfree)
    except (RunConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from megatron.bridge.training.pretrain import pretrain

    pretrain(config, import_object(args.forward_step), callbacks=[callback] if callback else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
