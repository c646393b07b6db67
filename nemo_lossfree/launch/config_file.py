"""Read a run config (configs/*.yaml) for the launcher, as nested dicts.

The project's loader, ``nemo_lossfree.run_config.load_run_config``, validates
the file and applies ``key=value`` overrides; the launcher uses it when it is
there. Without it (a trimmed install) the YAML is read directly and overrides
are applied the same way (dotted keys, YAML-typed values).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import yaml


def _as_dict(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _as_dict(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _as_dict(dataclasses.asdict(value))
    if hasattr(value, "to_dict"):
        return _as_dict(value.to_dict())
    return value


def apply_override(config: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ValueError(f"override: expected section.key=value, got {override!r}")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override: bad key {key!r} in {override!r}")
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None


def read_run_config(path: str, overrides: list[str]) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ValueError(f"--config: no such file: {path}")
    try:
        from nemo_lossfree.run_config import load_run_config
    except ImportError:
        load_run_config = None
    if load_run_config is not None:
        return _as_dict(load_run_config(path, list(overrides)))
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a YAML mapping of sections")
    for override in overrides:
        apply_override(data, override)
    return data
