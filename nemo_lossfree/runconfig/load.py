"""Load a run config (YAML file + ``a.b=value`` overrides) through OmegaConf, into a plain dict.

The file layout follows Megatron-Bridge's ``ConfigContainer`` section names
(``model``, ``train``, ``optimizer``, ``checkpoint``, ...), so the same file
works as a Bridge ``--config-file``, plus sections of ours:

- ``cluster``: the layout the file is written for (``nodes``,
  ``gpus_per_node`` (0 = CPU processes with gloo), ``tasks_per_node``).
- ``lossfree``: ``LossFreeConfig`` fields (``enabled`` included).
- ``demo``: what only the CPU demo worker reads (``nemo_lossfree.apps.demo.run_config``).

OmegaConf does what Megatron-Bridge does with the same files: YAML 1.2
scalars (``1e-3`` is a float), a key stated twice in one mapping refused,
``${...}`` interpolation, dotted overrides typed like YAML values, and the
typed sections (``cluster``, ``lossfree``) merged into their dataclasses, which
refuse unknown keys and convert or refuse values (``"0.5"`` -> 0.5 for a
float field, ``abc`` refused). The result is a plain ``dict`` holding the
keys the file and the overrides state (no defaults filled in); values are
checked against the rules by ``validate``.

``load_run_config`` is the one reader of run-config files (``validate-config``,
``slurm``, the demo worker and the Bridge entry point come through it); every
problem is one ``RunConfigError`` line naming the key (and where it came
from) or the file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from nemo_lossfree.config import LossFreeConfig


@dataclasses.dataclass
class ClusterSection:
    """The layout a run config is written for."""

    nodes: Optional[int] = None
    #: 0: CPU processes with gloo.
    gpus_per_node: Optional[int] = None
    #: Ranks per node; default: one per GPU (CPU runs must say).
    tasks_per_node: Optional[int] = None


#: Our sections with a schema (a dataclass that types and checks their keys).
TYPED_SECTIONS: dict[str, type] = {"cluster": ClusterSection, "lossfree": LossFreeConfig}
#: Our sections, then Megatron-Bridge 0.6's ConfigContainer fields.
OUR_SECTIONS = ("cluster", "lossfree", "demo")
BRIDGE_SECTIONS = (
    "model", "train", "optimizer", "scheduler", "dataset", "logger", "tokenizer",
    "checkpoint", "dist", "ddp", "rng", "validation", "rerun_state_machine", "ft",
    "straggler", "nvrx_straggler", "profiling", "peft", "comm_overlap",
    "mixed_precision", "tensor_inspect", "inprocess_restart", "env_vars",
)
SECTIONS = OUR_SECTIONS + BRIDGE_SECTIONS
#: Bridge sections that may be a plain value (a recipe name such as "bf16_mixed").
SCALAR_SECTIONS = ("mixed_precision", "env_vars")

#: The largest run-config file read. The shipped configs are a few KiB;
#: YAML parsers need ~100 s and ~2 GB for a 27 MB file, so a bigger one is a
#: mistake (a checkpoint or a log passed as the config) to refuse, not parse.
MAX_CONFIG_BYTES = 1 << 20


class RunConfigError(ValueError):
    """A problem in a run config; the message starts with the offending key."""


class ConfigFileError(RunConfigError):
    """A problem with the file itself (missing, unreadable, not YAML); the message starts with its path.

    A command that took the path from a flag puts the flag first
    (``load_run_config(..., flag="--config-file")``: ``--config-file: x.yaml: no such file``).
    """


# ------------------------------------------------------------------ the file
def _mark(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _duplicate_key(path: Path, text: str, exc: yaml.MarkedYAMLError) -> Optional[RunConfigError]:
    """Name the key and both lines of OmegaConf's "found duplicate key" refusal.

    OmegaConf's loader refuses the second key (PyYAML alone would keep the
    last without a word, so a second ``lossfree:`` section would replace the
    first); its message points at the line but not the dotted key or the
    first line, which are found in the composed (not constructed) document.
    """
    where = exc.problem_mark
    if where is None or not str(exc.problem).startswith("found duplicate key"):
        return None

    def find(node: yaml.Node, keys: tuple[str, ...]) -> Optional[tuple[str, int]]:
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                if (key_node.start_mark.line, key_node.start_mark.column) == (where.line, where.column):
                    return ".".join(keys + (name,)), first.get(name, where.line) + 1
                first.setdefault(name, key_node.start_mark.line)
                found = find(value_node, keys + (name,))
                if found:
                    return found
        elif isinstance(node, yaml.SequenceNode):
            parent = keys[-1] if keys else ""
            for index, item in enumerate(node.value):
                found = find(item, keys[:-1] + (f"{parent}[{index}]",))
                if found:
                    return found
        return None

    found = find(yaml.compose(text, Loader=yaml.SafeLoader), ())
    if found is None:
        return None
    dotted, first_line = found
    return RunConfigError(
        f"{dotted}: duplicate key in {path} (lines {first_line} and {where.line + 1}); "
        "YAML would keep only the last, remove one"
    )


def _yaml_error(path: Path, text: str, exc: yaml.YAMLError) -> RunConfigError:
    """One line for a YAML error: the file and line first, the parser's words after.

    The parser's own message is several lines and names the input
    ``"<unicode string>"``; the file name and the line are what a user needs.
    """
    if isinstance(exc, yaml.MarkedYAMLError) and (exc.problem_mark or exc.context_mark):
        duplicate = _duplicate_key(path, text, exc)
        if duplicate is not None:
            return duplicate
        where = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem and exc.context_mark is not None:
            what += f" ({exc.context} started at {_mark(exc.context_mark)})"
        return ConfigFileError(f"{path}: {_mark(where)}: not valid YAML: {what}")
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        return ConfigFileError(f"{path}: line {line}: not valid YAML: control character "
                               f"#x{exc.character:02x} is not allowed")
    return ConfigFileError(f"{path}: not valid YAML: {' '.join(str(exc).split())}")


def _read_text(path: Path) -> str:
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
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigFileError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
            "a run config is a YAML text file"
        ) from None


def _plain(config: Any, origin: str) -> Any:
    """OmegaConf's container as plain dicts and lists, interpolations resolved."""
    try:
        return OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as exc:
        raise RunConfigError(f"{exc.full_key}: {_reason(exc)} (in {origin})") from None


def read_yaml_file(path: Union[str, Path]) -> Any:
    """The YAML of a run-config file (OmegaConf's reading, as plain containers); any problem is one line.

    ``ConfigFileError``, starting with the path: a missing or unreadable
    path, a directory, more than ``MAX_CONFIG_BYTES`` (checked before
    parsing: a parser's time and memory grow far faster than the file), bytes
    that are not UTF-8, YAML syntax errors (with the line and column),
    nesting deeper than Python's recursion limit, a top level that is no mapping.
    ``RunConfigError``, starting with the dotted key and naming the file: a
    key stated twice in one mapping.
    """
    path = Path(path)
    text = _read_text(path)
    try:
        loaded = OmegaConf.create(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(path, text, exc) from None
    except RecursionError:  # the parser and OmegaConf both recurse
        raise ConfigFileError(f"{path}: not valid YAML for a run config: nested too deeply") from None
    except (AssertionError, OmegaConfBaseException):  # a bare scalar at the top
        loaded = None
    if not OmegaConf.is_dict(loaded):
        raise ConfigFileError(f"{path}: the top level must be a mapping of sections")
    return _plain(loaded, str(path))


# ---------------------------------------------------------------- sections
def _reason(exc: OmegaConfBaseException) -> str:
    """OmegaConf's message without its ``full_key:``/``object_type=`` lines."""
    return str(exc).split("\n")[0].strip()


def _check_section_names(config: Mapping[str, Any], origin: str) -> None:
    for key in config:
        if key not in SECTIONS:
            raise RunConfigError(
                f"{key}: unknown section in {origin}; allowed sections are {', '.join(SECTIONS)}"
            )


def typed_section(name: str, values: Any, origin: str) -> Optional[dict[str, Any]]:
    """One typed section, merged into its dataclass by OmegaConf: the keys given, typed.

    Unknown keys and values that cannot be the field's type are refused,
    naming ``<section>.<key>`` and ``origin``; the values themselves (ranges,
    relations between fields) are the dataclass's to check.
    """
    if values is None:
        return None
    schema = TYPED_SECTIONS[name]
    if not isinstance(values, Mapping):
        raise RunConfigError(f"{name}: must be a mapping of {schema.__name__} fields, got {values!r} "
                             f"(in {origin})")
    fields = [f.name for f in dataclasses.fields(schema)]
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), dict(values))
    except ConfigKeyError as exc:
        raise RunConfigError(
            f"{name}.{exc.full_key}: unknown key in {origin}; allowed keys are {', '.join(sorted(fields))}"
        ) from None
    except OmegaConfBaseException as exc:
        raise RunConfigError(f"{name}.{exc.full_key}: {_reason(exc)} (in {origin})") from None
    return {key: typed[key] for key in values}


def _check_sections(config: dict[str, Any], origin: str) -> None:
    """Section names known, sections mappings, typed sections typed (in place)."""
    _check_section_names(config, origin)
    for key, value in config.items():
        if key in TYPED_SECTIONS:
            config[key] = typed_section(key, value, origin)
        elif value is not None and not isinstance(value, dict) and key not in SCALAR_SECTIONS:
            raise RunConfigError(f"{key}: must be a mapping of keys, got {value!r} (in {origin})")


# --------------------------------------------------------------- overrides
def _override(config: dict[str, Any], override: str) -> tuple[str, Any]:
    """``(dotted key, typed value)`` of one ``a.b.c=value`` (Hydra's ``+a.b=value`` too)."""
    dotted, sep, raw = override.partition("=")
    dotted = dotted.strip().lstrip("+")
    parts = dotted.split(".")
    if not sep or not dotted or any(not p for p in parts):
        raise RunConfigError(f"{override}: an override must look like section.key=value")
    if parts[0] not in SECTIONS:
        raise RunConfigError(
            f"{parts[0]}: unknown section in override {override!r}; allowed sections are "
            f"{', '.join(SECTIONS)}"
        )
    node: Any = config
    for depth, part in enumerate(parts[:-1]):
        node = node.get(part) if isinstance(node, dict) else None
        if node is not None and not isinstance(node, dict):
            key = ".".join(parts[: depth + 1])
            raise RunConfigError(f"{key}: is {node!r}, not a section; cannot set {dotted}")
    try:
        # OmegaConf's dotlist: the value typed like YAML (1e-3, true, null, [0, 1]).
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"x={raw.strip()}"]))["x"]
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise RunConfigError(f"{dotted}: value {raw!r} is not a YAML value: "
                             f"{' '.join(str(exc).split())}") from None
    return dotted, value


def load_run_config(
    path: Optional[Union[str, Path]],
    overrides: Iterable[str] = (),
    *,
    flag: Optional[str] = None,
) -> dict[str, Any]:
    """Read ``path`` (may be None: overrides only), apply ``overrides``, return a dict.

    Raises ``RunConfigError`` (a ``ValueError``), one line: naming the file
    for problems with the file (``read_yaml_file``), the key (and the file or
    override) for unknown sections or keys, values of the wrong type and
    malformed overrides. ``flag``: the command-line flag that gave ``path``,
    put first in a problem with the file.
    """
    config: dict[str, Any] = {}
    if path is not None:
        try:
            config = read_yaml_file(path)
        except ConfigFileError as exc:
            if flag is None:
                raise
            raise ConfigFileError(f"{flag}: {exc}") from None
        _check_sections(config, str(path))
    for override in overrides:
        dotted, value = _override(config, override)
        merged = OmegaConf.create(config)
        OmegaConf.update(merged, dotted, value, merge=True)
        config = _plain(merged, f"override {override!r}")
        _check_sections(config, f"override {override!r}")
    return config


# ---------------------------------------------------------------- accessors
def tasks_per_node(cluster: Mapping[str, Any]) -> Any:
    """``cluster.tasks_per_node``, defaulting to ``gpus_per_node`` (one rank per GPU); None if unknown."""
    value = cluster.get("tasks_per_node")
    if value is None:
        gpus = cluster.get("gpus_per_node")
        return gpus if gpus else None  # CPU runs (0 GPUs) must say how many processes
    return value


def split_sections(config: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """``(bridge_part, cluster, lossfree)``: what Megatron-Bridge sees and our sections."""
    import copy

    bridge = {k: copy.deepcopy(v) for k, v in config.items() if k not in OUR_SECTIONS}
    return bridge, dict(config.get("cluster") or {}), dict(config.get("lossfree") or {})


def save_run_config(config: Mapping[str, Any], path: Union[str, Path]) -> None:
    """Write a resolved run config as YAML (what ``load_run_config`` reads back unchanged)."""
    OmegaConf.save(OmegaConf.create(dict(config)), Path(path))
