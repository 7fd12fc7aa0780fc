"""Typed configs: dataclasses loaded from YAML and `key=value` overrides.

`load_config(Cls, path, overrides)` builds a dataclass tree and refuses anything it does not
know: an unknown key or a value of the wrong type is a UserError that names the dotted key
(`optimizer.lr`) and what would be right (the nearest known key, the expected type). Field docs live
next to each field, as trailing `# ...` comments in the dataclasses that use this; `raylm.core.cli_args`
turns them into command-line help.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from raylm.core.errors import UserError

T = TypeVar("T")


def did_you_mean(word: str, known: typing.Iterable[str], prefix: str = "") -> str:
    """` (did you mean 'x'?)` for the nearest of `known` (shown after `prefix`), or "" when none is close.

    Matched without the prefix: a long shared `section.` would make any two keys look alike.
    """
    nearest = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {prefix + nearest[0]!r}?)" if nearest else ""


def type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (converted where lossless)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return coerce(value, option, key)
            except UserError:
                continue
        raise UserError(f"config key {key!r}: expected {type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise UserError(f"config key {key!r}: expected null, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise UserError(f"config key {key!r}: expected one of {type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config key {key!r}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key!r}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    raise UserError(f"config key {key!r}: expected {type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and ill-typed values."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        hint = did_you_mean(unknown[0], fields, prefix) or f" (known keys here: {', '.join(sorted(fields))})"
        raise UserError(f"unknown config key {prefix + unknown[0]!r}{hint}")
    kwargs = {name: coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field left out
        raise UserError(f"config section {prefix.rstrip('.') or cls.__name__!r}: {err}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`optimizer.lr=3e-4` -> ("optimizer.lr", 0.0003); values are parsed as YAML scalars."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form key=value (e.g. optimizer.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override {text!r} has an empty key")
    return key, parse_scalar(raw)


def parse_scalar(raw: str) -> Any:
    """Command-line text read as YAML: `3` -> 3, `true` -> True, `[a, b]` -> a list, `x` -> "x"."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads `3e-4` as a string; numbers written that way are meant as floats.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return value


def value_from_text(text: str, tp: Any, key: str) -> Any:
    """Command-line text as a value of type `tp`: read as YAML when that fits, else taken as it is.

    So `--max-docs 5` is 5 and `--text-field 123` or `--api-key true` stay strings.
    """
    for value in (parse_scalar(text), text):
        try:
            return coerce(value, tp, key)
        except UserError:
            continue
    raise UserError(f"config key {key!r}: expected {type_name(tp)}, got {text!r}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: typing.Iterable[str | tuple[str, Any]] = (),
    base: dict[str, Any] | None = None,
) -> T:
    """YAML file (or `base` dict) + overrides -> a validated `cls` instance.

    An override is `key=value` text (the value read as YAML) or a (dotted key, value) pair, as
    command-line flags give them (raylm.core.cli_args); later ones win.
    """
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        tree = read_yaml(path)
    apply_overrides(tree, override_pairs(overrides))
    return from_dict(cls, tree)


def override_pairs(overrides: typing.Iterable[str | tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [parse_override(item) if isinstance(item, str) else item for item in overrides]


def apply_overrides(tree: dict[str, Any], pairs: typing.Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Set each (dotted key, value) in the nested mapping `tree`, in order; returns `tree`."""
    for key, value in pairs:
        _set_dotted(tree, key, value)
    return tree


def leaf_keys(tree: Any, prefix: str = "") -> set[str]:
    """The dotted keys a nested mapping sets: {"data": {"seq_len": 64}} -> {"data.seq_len"}."""
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip(".")} if prefix else set()
    return set().union(*(leaf_keys(value, f"{prefix}{key}.") for key, value in tree.items()))


def override_keys(pairs: typing.Iterable[tuple[str, Any]]) -> set[str]:
    """The dotted keys (key, value) overrides set; a mapping value sets each of its leaves."""
    return set().union(set(), *(leaf_keys(value, f"{key}.") for key, value in pairs))


def get_dotted(obj: Any, dotted: str) -> Any:
    """`obj.a.b` (attributes, as of a dataclass tree) or `obj["a"]["b"]` (a mapping) for "a.b"."""
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj
