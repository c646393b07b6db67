"""Import stand-ins for the Megatron-Bridge CI lane (CPU only, no NVIDIA extras).

Megatron-Bridge 0.6.2 imports two NVIDIA packages outside any try/except:

- Transformer Engine, in ``megatron.bridge.peft.lora_layers`` (at import of
  ``megatron.bridge``). It has no wheel for a CPU-only machine, and building it
  needs CUDA headers.
- nvidia-resiliency-ext, in ``megatron.bridge.training.pretrain`` (only the
  name ``CallWrapper``, used as a type annotation of the in-process-restart
  path). The versions installable here (<= 0.4.1) have no ``__version__``, and
  Megatron-Core's ``dist_checkpointing`` then fails to import.

What the stand-ins hide, exactly:
- They are served only to the importing modules listed in ``SERVED_TO``,
  through a wrapper around ``builtins.__import__`` that reads the importing
  module's name, and they never enter ``sys.modules``. Megatron-Core,
  Megatron-Bridge's own ``try: import transformer_engine`` probes and all other
  code still see both packages as absent, as they are on this machine, and
  take their non-TE / non-NVRx code paths (local layer specs, torch optimizers,
  torch distributed checkpointing).
- Their classes exist for annotations and ``isinstance`` checks only;
  instantiating one raises ``RuntimeError``. LoRA on Transformer Engine layers
  and in-process restart (their only users) are not exercised by the lane.

Use: ``python tests/_support/bridge_lane/run_with_stand_ins.py -m MODULE ARGS...``.
"""

from __future__ import annotations

import builtins
import types

#: importing module -> the top-level package it is given a stand-in for.
SERVED_TO = {
    "megatron.bridge.peft.lora_layers": "transformer_engine",
    "megatron.bridge.training.pretrain": "nvidia_resiliency_ext",
}

_original_import = builtins.__import__
_installed = False


def _placeholder(qualname: str) -> type:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            f"{qualname}: not installed; this is the Bridge CI lane's import stand-in "
            "(tests/_support/bridge_lane/import_stand_ins.py)"
        )

    name = qualname.rsplit(".", 1)[-1]
    return type(name, (), {"__init__": __init__, "__module__": "import_stand_ins", "__qualname__": qualname})


def _package(qualname: str, children: dict) -> types.ModuleType:
    module = types.ModuleType(qualname)
    for name, child in children.items():
        if isinstance(child, dict):
            setattr(module, name, _package(f"{qualname}.{name}", child))
        else:
            setattr(module, name, _placeholder(f"{qualname}.{name}"))
    return module


# Exactly the names the importers above use.
_STAND_INS = {
    "transformer_engine": _package(
        "transformer_engine",
        {
            "pytorch": {
                "Linear": None,
                "LayerNormLinear": None,
                "ops": {n: None for n in ("Sequential", "Linear", "LayerNorm", "RMSNorm",
                                          "Quantize", "MakeExtraOutput", "Dropout")},
            }
        },
    ),
    "nvidia_resiliency_ext": _package("nvidia_resiliency_ext", {"inprocess": {"CallWrapper": None}}),
}


def _resolve(root: types.ModuleType, name: str) -> types.ModuleType:
    module = root
    for part in name.split(".")[1:]:
        module = getattr(module, part)
    return module


def _import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and globals:
        package = SERVED_TO.get(globals.get("__name__", ""))
        if package and (name == package or name.startswith(package + ".")):
            root = _STAND_INS[package]
            try:
                leaf = _resolve(root, name)
            except AttributeError:
                raise ModuleNotFoundError(f"No module named {name!r} (stand-in)", name=name) from None
            return leaf if fromlist else root
    return _original_import(name, globals, locals, fromlist, level)


def install() -> None:
    """Serve the stand-ins to the modules in ``SERVED_TO`` from now on (idempotent)."""
    global _installed
    if not _installed:
        builtins.__import__ = _import
        _installed = True
