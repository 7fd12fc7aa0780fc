"""Command lines generated from the typed configs of raylm.core.config.

`add_config_flags(parser, Cls)` gives every top-level scalar field of the config dataclass `Cls`
(str, int, float, bool, a Literal, or one of these or None) a flag `--field-name`: its type and
choices from the annotation, a bool as `--x/--no-x`, the default from the dataclass and the help
from the field's trailing `# ...` comment in the dataclass source (the one place field docs are
written). Sections and lists get no flag: when `Cls` has any, a trailing `key=value ...` argument
sets them by dotted key (`optimizer.lr=3e-4`). `shortcuts` adds flags for nested keys
(`{"num-workers": "scaling.num_workers"}`).

A flag that is not given is absent from the parsed namespace (argparse.SUPPRESS), so it never
hides a config file's value: dataclass default < config file < `key=value` < flag.
`config_values(args)` returns the flags given as {dotted key: value}; `parse_command_line` is
`parse_args` that names the nearest flag when one is unknown.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from raylm.core.config import did_you_mean, type_name, value_from_text
from raylm.core.errors import UserError

CONFIG_DEST = "config:"  # namespace attributes of config flags: "config:" + dotted key
SCALARS = (str, int, float, bool, type(None))


def is_scalar(tp: Any) -> bool:
    if get_origin(tp) is Literal:
        return True
    if get_origin(tp) in (Union, types.UnionType):
        return all(is_scalar(option) for option in get_args(tp))
    return tp in SCALARS


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its trailing comment} for a dataclass and its dataclass bases.

    A comment-only line right below a documented field continues that field's doc.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped: flags without help text
        return {}
    own = set(vars(cls).get("__annotations__", {}))
    docs: dict[str, str] = {}
    last, last_row = None, 0
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        row, code = token.start[0], token.line[: token.start[1]].strip()
        text = token.string.lstrip("#").strip()
        name = code.split(":", 1)[0].strip()
        if ":" in code and name in own:
            docs[name], last, last_row = text, name, row
        elif not code and last is not None and row == last_row + 1:
            docs[last], last_row = f"{docs[last]} {text}", row
        else:
            last = None
    return docs


def add_config_flags(parser: argparse.ArgumentParser, cls: type, shortcuts: dict[str, str] | None = None, note: str | None = None) -> None:
    """A flag per top-level scalar field of `cls` and per shortcut; `key=value ...` when `cls` has sections.

    `note` heads the flags in --help (say where a value comes from when no flag is given).
    """
    hints = get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    flags = {f.name.replace("_", "-"): f.name for f in fields if is_scalar(hints[f.name])}
    group = parser.add_argument_group("settings", note)
    for flag, key in {**flags, **(shortcuts or {})}.items():
        group.add_argument(f"--{flag}", dest=CONFIG_DEST + key, default=argparse.SUPPRESS, **_flag_options(cls, key))
    rest = [f.name + ".*" * dataclasses.is_dataclass(hints[f.name]) for f in fields if f.name not in flags.values()]
    if rest:
        parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help=f"any setting by its dotted key, these too: {', '.join(rest)}; values are read as YAML")


def _flag_options(cls: type, key: str) -> dict[str, Any]:
    """add_argument's keywords for the field at dotted `key`: type, choices, help, default shown, required."""
    *sections, name = key.split(".")
    for section in sections:
        cls = get_type_hints(cls)[section]
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    tp = get_type_hints(cls)[name]
    required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    notes = [key] if sections else []
    if not required and field.default not in (None, ""):
        notes.append(f"default: {str(field.default).lower() if tp is bool else field.default}")
    help_text = field_docs(cls).get(name, "") + (f" ({'; '.join(notes)})" if notes else "")
    options: dict[str, Any] = {"help": help_text.replace("%", "%%"), "required": required}
    if tp is bool:
        return {**options, "action": argparse.BooleanOptionalAction}
    if get_origin(tp) is Literal:
        options["choices"] = get_args(tp)
    else:
        options["metavar"] = name.upper()
    return {**options, "type": _text_reader(tp, key)}


def _text_reader(tp: Any, key: str):
    """argparse `type=` for a field of type `tp`; a wrong value is argparse's error, naming the flag."""

    def read(text: str) -> Any:
        try:
            return value_from_text(text, tp, key)
        except UserError:
            raise argparse.ArgumentTypeError(f"expected {type_name(tp)}, got {text!r}") from None

    return read


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """{dotted key: value} of the config flags given on the command line."""
    return {name.removeprefix(CONFIG_DEST): value for name, value in vars(args).items() if name.startswith(CONFIG_DEST)}


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args`, options and `key=value` in any order; an unknown option names the nearest one."""
    args, unknown = parser.parse_known_intermixed_args(argv)
    if unknown:
        word = unknown[0]
        if not word.startswith("-"):
            parser.error(f"unexpected argument {word!r}")
        options = [option for action in parser._actions for option in action.option_strings]
        parser.error(f"unknown option {word!r}{did_you_mean(word.split('=', 1)[0], options)}")
    return args
