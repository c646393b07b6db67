"""Load a run config (YAML file + ``key=value`` overrides) into a plain dict.

The file layout follows Megatron-Bridge's ``ConfigContainer`` section names
(``model``, ``train``, ``optimizer``, ``checkpoint``, ...), so the same file
works as a Bridge ``--config-file``, plus two sections of ours:

- ``cluster``: the layout the file is written for (``nodes``,
  ``gpus_per_node`` (0 = CPU processes with gloo), ``tasks_per_node``).
- ``lossfree``: ``LossFreeConfig`` fields plus ``enabled``.

Values are typed like OmegaConf/Hydra do (YAML 1.2 scalars): ``1e-3`` is a
float here, where PyYAML's YAML 1.1 rules would read a string. The result is a
plain ``dict``; no framework is imported.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import yaml

#: Our sections, then Megatron-Bridge 0.6's ConfigContainer fields.
OUR_SECTIONS = ("cluster", "lossfree")
BRIDGE_SECTIONS = (
    "model", "train", "optimizer", "scheduler", "dataset", "logger", "tokenizer",
    "checkpoint", "dist", "ddp", "rng", "validation", "rerun_state_machine", "ft",
    "straggler", "nvrx_straggler", "profiling", "peft", "comm_overlap",
    "mixed_precision", "tensor_inspect", "inprocess_restart", "env_vars",
)
SECTIONS = OUR_SECTIONS + BRIDGE_SECTIONS

CLUSTER_KEYS = ("nodes", "gpus_per_node", "tasks_per_node")


class RunConfigError(ValueError):
    """A problem in a run config; the message starts with the offending key."""


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader whose floats follow YAML 1.2 (``1e-3``, ``-2E5``), like OmegaConf."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML text with YAML 1.2 float rules."""
    return yaml.load(text, Loader=_Yaml12Loader)


def parse_scalar(text: str) -> Any:
    """Type one override value: ``true`` -> True, ``1e-3`` -> 0.001, ``null`` -> None, ``[1,2]`` -> list."""
    if text == "":
        return ""
    try:
        return parse_yaml(text)
    except yaml.YAMLError:
        return text


def _check_sections(config: Mapping[str, Any], origin: str) -> None:
    for key in config:
        if key not in SECTIONS:
            raise RunConfigError(
                f"{key}: unknown section in {origin}; allowed sections are {', '.join(SECTIONS)}"
            )


def apply_override(config: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override in place (Hydra's ``+a.b=value`` is accepted too)."""
    if "=" not in override:
        raise RunConfigError(f"{override}: an override must look like section.key=value")
    dotted, _, raw = override.partition("=")
    dotted = dotted.strip().lstrip("+")
    parts = dotted.split(".")
    if not dotted or any(not p for p in parts):
        raise RunConfigError(f"{override}: an override must look like section.key=value")
    if parts[0] not in SECTIONS:
        raise RunConfigError(
            f"{parts[0]}: unknown section in override {override!r}; allowed sections are "
            f"{', '.join(SECTIONS)}"
        )
    node = config
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            key = ".".join(parts[: depth + 1])
            raise RunConfigError(f"{key}: is {child!r}, not a section; cannot set {dotted}")
        node = child
    node[parts[-1]] = parse_scalar(raw.strip())


def load_run_config(
    path: Optional[Union[str, Path]],
    overrides: Iterable[str] = (),
) -> dict[str, Any]:
    """Read ``path`` (may be None: overrides only), apply ``overrides``, return a dict.

    Raises ``RunConfigError`` (a ``ValueError``) naming the key for unknown
    sections, sections that are not mappings and malformed overrides;
    ``FileNotFoundError`` for a missing file.
    """
    config: dict[str, Any] = {}
    origin = "overrides"
    if path is not None:
        path = Path(path)
        origin = str(path)
        try:
            loaded = parse_yaml(path.read_text())
        except yaml.YAMLError as exc:
            raise RunConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RunConfigError(f"{path}: the top level must be a mapping of sections")
        _check_sections(loaded, origin)
        config = copy.deepcopy(loaded)
    for override in overrides:
        apply_override(config, override)
    for key in (s for s in SECTIONS if s not in ("mixed_precision", "env_vars")):
        if key in config and config[key] is not None and not isinstance(config[key], dict):
            raise RunConfigError(f"{key}: must be a mapping of keys, got {config[key]!r}")
    return config


def tasks_per_node(cluster: Mapping[str, Any]) -> Any:
    """``cluster.tasks_per_node``, defaulting to ``gpus_per_node`` (one rank per GPU); None if unknown."""
    value = cluster.get("tasks_per_node")
    if value is None:
        gpus = cluster.get("gpus_per_node")
        return gpus if gpus else None  # CPU runs (0 GPUs) must say how many processes
    return value


def split_sections(config: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """``(bridge_part, cluster, lossfree)``: what Megatron-Bridge sees and our two sections."""
    bridge = {k: copy.deepcopy(v) for k, v in config.items() if k not in OUR_SECTIONS}
    return bridge, dict(config.get("cluster") or {}), dict(config.get("lossfree") or {})
