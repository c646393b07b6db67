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

``read_yaml_file`` is the one place a run-config file is read (the
``validate-config``, ``slurm`` and Bridge entry points all come through
``load_run_config``); every problem with the file itself is one
``RunConfigError`` line naming it.
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

#: The largest run-config file read. The shipped configs are a few KiB;
#: PyYAML needs ~100 s and ~2 GB for a 27 MB file, so a bigger one is a
#: mistake (a checkpoint or a log passed as the config) to refuse, not parse.
MAX_CONFIG_BYTES = 1 << 20


class RunConfigError(ValueError):
    """A problem in a run config; the message starts with the offending key."""


class ConfigFileError(RunConfigError):
    """A problem with the file itself (missing, unreadable, not YAML); the message starts with its path.

    A command that took the path from a flag may put the flag first
    (``--config-file: x.yaml: no such file``).
    """


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


def _mark(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_error_line(path: Path, text: str, exc: yaml.YAMLError) -> str:
    """One line for a PyYAML error: the file and line first, PyYAML's words after.

    PyYAML's own message is several lines and names the input
    ``"<unicode string>"``; the file name and the line are what a user needs.
    """
    if isinstance(exc, yaml.MarkedYAMLError) and (exc.problem_mark or exc.context_mark):
        where = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem and exc.context_mark is not None:
            what += f" ({exc.context} started at {_mark(exc.context_mark)})"
        return f"{path}: {_mark(where)}: not valid YAML: {what}"
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        return (f"{path}: line {line}: not valid YAML: control character #x{exc.character:02x} "
                "is not allowed")
    return f"{path}: not valid YAML: {' '.join(str(exc).split())}"


def _check_duplicate_keys(node: yaml.Node, path: Path, keys: tuple[str, ...] = (),
                          seen: Optional[set[int]] = None) -> None:
    """Refuse a mapping that states a key twice, at any depth.

    PyYAML keeps the last of two equal keys without a word, so a second
    ``lossfree:`` section would silently replace the first. Keys merged in
    with ``<<: *anchor`` may be overridden: that is YAML's merge, not a
    duplicate.
    """
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias: checked where its anchor is
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                _check_duplicate_keys(value_node, path, keys, seen)
                continue
            name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            identity = (key_node.tag, name)  # the tag: 1 and "1" are different keys
            if name != "?" and identity in lines:
                dotted = ".".join(keys + (name,))
                raise RunConfigError(
                    f"{dotted}: duplicate key in {path} (lines {lines[identity]} and "
                    f"{key_node.start_mark.line + 1}); YAML would keep only the last, remove one"
                )
            lines[identity] = key_node.start_mark.line + 1
            _check_duplicate_keys(value_node, path, keys + (name,), seen)
    elif isinstance(node, yaml.SequenceNode):
        parent = keys[-1] if keys else ""
        for index, item in enumerate(node.value):
            _check_duplicate_keys(item, path, keys[:-1] + (f"{parent}[{index}]",), seen)


def read_yaml_file(path: Union[str, Path]) -> Any:
    """The parsed YAML of a run-config file; any problem is one line.

    ``ConfigFileError``, starting with the path: a missing or unreadable
    path, a directory, more than ``MAX_CONFIG_BYTES`` (checked before
    parsing: PyYAML's time and memory grow far faster than the file), bytes
    that are not UTF-8, YAML syntax errors (with the line and column),
    nesting deeper than Python's recursion limit.
    ``RunConfigError``, starting with the dotted key and naming the file: a
    key stated twice in one mapping.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)  # not read(): /dev/zero never ends
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigFileError(f"{path}: is a directory, not a YAML file") from None
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        size = path.stat().st_size if path.is_file() else 0
        size = f"{size} bytes" if size > MAX_CONFIG_BYTES else "a stream longer than that"
        raise ConfigFileError(
            f"{path}: must be at most 1 MiB ({MAX_CONFIG_BYTES} bytes) to be a run config, got {size}"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigFileError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
            "a run config is a YAML text file"
        ) from None
    try:
        loader = _Yaml12Loader(text)  # checks for unprintable characters already
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_duplicate_keys(node, path)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigFileError(_yaml_error_line(path, text, exc)) from None
    except RecursionError:  # PyYAML composes and constructs recursively
        raise ConfigFileError(f"{path}: not valid YAML for a run config: nested too deeply") from None


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

    Raises ``RunConfigError`` (a ``ValueError``), one line: naming the file
    for problems with the file (``read_yaml_file``), the key for unknown
    sections, sections that are not mappings and malformed overrides.
    """
    config: dict[str, Any] = {}
    origin = "overrides"
    if path is not None:
        path = Path(path)
        origin = str(path)
        loaded = read_yaml_file(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigFileError(f"{path}: the top level must be a mapping of sections")
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
