"""Typed experiment configuration.

Configs are plain dataclasses whose fields each carry a one-line help text (``cfg(default, "help")``).
They are read from YAML files under ``configs/`` and then overridden by ``key=value`` strings from the
command line (``trainer.lr=3e-4``, ``eval.ks=[1,5,10]``). Both steps are strict: a key that no field
declares, or a value of the wrong type, raises :class:`ConfigError` with the offending key or value and the
list of valid keys, so that a typo can never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from capret.errors import ConfigError

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "cfg",
    "config_help",
    "from_dict",
    "load_config",
    "load_yaml_file",
    "merge_trees",
    "move_flat_keys",
    "parse_overrides",
    "save_config",
    "same_name_in",
    "set_nested",
    "to_dict",
]


class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.2-style scalars: ``1e-3`` is a float and only true/false are booleans (``off`` stays a string)."""


_ConfigLoader.yaml_implicit_resolvers = {
    key: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")
    ]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_ConfigLoader.add_implicit_resolver(
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


def _construct_mapping_no_duplicates(
    loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False
) -> Any:
    """A mapping whose keys are unique: a repeated key is a mistake (the later value would silently win)."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        line = key_node.start_mark.line + 1
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: let the default constructor report it
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {first})", key_node.start_mark
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_ConfigLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping_no_duplicates,  # type: ignore[arg-type]
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """``line L, column C: problem`` from a YAML error (without PyYAML's "<unicode string>" source name)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def load_yaml_file(path: str | Path) -> Any:
    """Parse a YAML file strictly: syntax errors and duplicate keys raise :class:`ConfigError` naming the file
    and line; undecodable bytes name the file too."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        return _yaml_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: invalid YAML at {_yaml_problem(exc)}") from None


def cfg(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:  # noqa: A002
    """Declare a config field with its help text.

    Mutable defaults (lists, dicts, nested configs) are passed as ``factory``.
    """
    if not help:
        raise ValueError("every config field needs a help text")
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _valid_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lossless cases (int -> float, str -> Path)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str | bytes) or not isinstance(value, Iterable):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        items = list(value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
            out = [_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(items, args))]
        else:
            inner = args[0] if args else Any
            out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(items)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {_valid_keys(tp)}, got {value!r}")
        return from_dict(tp, value, _where=where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: Mapping[str, Any], *, _where: str = "") -> T:
    """Build the dataclass ``cls`` from a (nested) mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = _valid_keys(cls)
    unknown = [k for k in data if k not in valid]
    if unknown:
        prefix = f"{_where}." if _where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} for {cls.__name__}; valid keys: {', '.join(valid)}"
        )
    kwargs = {}
    for key, value in data.items():
        where = f"{_where}.{key}" if _where else key
        kwargs[key] = _coerce(value, hints[key], where)
    missing = [
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{cls.__name__}: required key(s) {missing} not given")
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-friendly dict of a config (paths as strings, tuples as lists)."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, list | tuple):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(config)


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1,2]"]`` into a nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = _yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from exc
        set_nested(nested, key.split("."), value, what=f"override {item!r}")
    return nested


def set_nested(tree: dict[str, Any], path: Sequence[str], value: Any, *, what: str) -> None:
    """``tree[path[0]]...[path[-1]] = value``, creating the sections on the way.

    Raises:
        ConfigError: a section on the path already holds a value (``what`` names the source in the message).
    """
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what}: {part} is both a value and a section")
    node[path[-1]] = value


def same_name_in(section: str, *keys: str) -> dict[str, tuple[str, str]]:
    """Places for :func:`move_flat_keys` of old flat keys that kept their name and moved into ``section``."""
    return {key: (section, key) for key in keys}


def move_flat_keys(
    raw: Mapping[str, Any],
    out: dict[str, Any],
    places: Mapping[str, Sequence[str]],
    *,
    skip: Collection[str] = (),
) -> None:
    """Put each key of an old flat config ``raw`` that ``places`` names at its place in the sectioned ``out``.

    Keys missing from ``raw`` or listed in ``skip`` are left out; a clash raises like :func:`set_nested`.
    """
    for key, where in places.items():
        if key in raw and key not in skip:
            set_nested(out, where, raw[key], what=f"flat config key {key!r}")


def merge_trees(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``update``, section by section (a new dict; values of ``update`` win)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Defaults of ``cls``, then the YAML file at ``path``, then ``key=value`` overrides."""
    data: dict[str, Any] = to_dict(cls())
    if path is not None:
        path = Path(path)
        loaded = load_yaml_file(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping, got {type(loaded).__name__}")
        try:
            from_dict(cls, merge_trees(data, loaded))  # validate the file on its own for a precise message
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
        data = merge_trees(data, loaded)
    data = merge_trees(data, parse_overrides(overrides))
    return from_dict(cls, data)


def save_config(config: Any, path: str | Path) -> None:
    """Write a config as YAML that :func:`load_config` reads back."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def config_help(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every field, nested sections flattened; used by ``--help`` texts."""
    rows: list[tuple[str, str, Any]] = []
    hints = typing.get_type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(config_help(hints[f.name], prefix=f"{key}."))
        else:
            rows.append((key, f.metadata.get("help", ""), getattr(instance, f.name)))
    return rows
