"""Typed settings: how YAML files and command lines become validated dataclasses, in one place.

Each group of settings is a frozen dataclass (raysae.config's run configs, harvest's
HarvestConfig, the splice evaluation's SpliceConfig, raysae.sweep_spec's specs): every field is
documented by the string under it (sparsify's style), choices are `Literal[...]`, and
`__post_init__` only validates, with the checks below. Input reaches them by one path:

    read_yaml        a YAML file → plain data; a missing file or bad YAML names the file
    set_dotted       one dotted key ("sae.k") set in that data: `raysae train --set`, a run
                     file's overrides and a sweep's space keys, with the same checks and errors
    from_dict        plain data → the dataclass: scalars coerced, unknown and missing keys named
                     with their section ("base.train: unknown key(s) 'lrr'")
    to_dict          the way back (JSON, YAML, Tune's param space)
    Options          command-line options from the fields, their docstrings as help

Fields typed `Location` are storage locations other processes read: `with_absolute_paths`
makes them absolute before a config travels to Ray workers and Tune trials, which run in other
working directories.

Python drops the field docstrings when it compiles a class, so the help texts are extracted once,
at development time, into `raysae.field_docs` (a plain dict), and the CLI reads that table:

    python -m raysae.settings        # rewrite raysae/field_docs.py after editing a docstring

`tests/test_settings.py` fails, naming that command, when the table and the docstrings
disagree. Nothing on a command's path parses source: `ast.parse` in a threaded CPython 3.11
process can fail at random (python/cpython#106905), and reading and parsing a module on every
`raysae` call was a cost every command paid. Importing this module is cheap (no torch, no Ray):
every `raysae` command starts with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from raysae.field_docs import FIELD_DOCS

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is missing, unknown, of the wrong type, or out of range."""


_LOCATION = "raysae.settings.Location"
Location = Annotated[str, _LOCATION]
"""A local path or s3://bucket/prefix that other processes read or write (see with_absolute_paths)."""


# ---------------------------------------------------------------- plain data → dataclasses


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from a dict, coercing scalars and rejecting unknown or missing keys.

    `where` is the dotted section `data` sits at (e.g. "sae", "base.train"): error messages name
    it, so they name the exact bad key.
    """
    label = where or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(
            f"{label}: expected a mapping of keys to values, got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ConfigError(
            f"{label}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], _dotted(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{label}: missing required key '{name}'")
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the checks above
        raise ConfigError(f"{label}: {e}") from e


def to_dict(config: Any) -> Any:
    """A plain, JSON/YAML-safe dict of a config (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [to_dict(x) for x in config]
    if isinstance(config, dict):
        return {k: to_dict(x) for k, x in config.items()}
    return config


def _coerce(tp: Any, value: Any, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(_without_none(tp), value, key)
    if origin is Literal:
        return _choice(args, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        key_type, value_type = args
        return {
            _coerce(key_type, k, key): _coerce(value_type, v, f"{key}.{k}")
            for k, v in value.items()
        }
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
        values = value if isinstance(value, (list, tuple)) else [value]  # `layers: 6` is [6]
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(values))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r}: expected a list of {len(args)} values")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is dict:  # free-form mapping, validated by whoever reads it
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if tp in (int, float):
        return _number(tp, value, key)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")  # pragma: no cover


def _number(tp: type, value: Any, key: str):
    # YAML 1.1 reads `1e6` as a string; accept it, and integral floats for int fields.
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected a number")
    if isinstance(value, str):
        try:
            value = float(value.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected a number") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r}: expected a finite number")
    if tp is int:
        if isinstance(value, int):
            return value
        if float(value) != int(value):
            raise ConfigError(f"{key}={value!r}: expected a whole number")
        return int(value)
    return float(value)


def _choice(allowed: tuple, value: Any, key: str) -> Any:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, allowed))}")
    return value


def _without_none(hint: Any) -> Any:
    """X for Optional[X] (X | None); other hints unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner
    return hint


def _dotted(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


# ---------------------------------------------------------------- checks for __post_init__


def check_positive(config: Any, *names: str, where: str) -> None:
    """Each named field of `config` is > 0 (None, where a field allows it, passes); `where`
    is the section errors name the field in, e.g. "sae" for sae.d_in."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise ConfigError(f"{_dotted(where, name)}={value} must be > 0")


def check_non_negative(config: Any, *names: str, where: str) -> None:
    """Each named field of `config` is >= 0 (None passes); `where` as for check_positive."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 0:
            raise ConfigError(f"{_dotted(where, name)}={value} must be >= 0")


def check_choices(config: Any, *, where: str) -> None:
    """Every `Literal`-typed field of `config` holds one of its values, and so does every item
    of a `tuple[Literal[...], ...]` field. from_dict checks input from files and command lines;
    this also covers settings built in code."""
    for name, hint in typing.get_type_hints(type(config)).items():
        value, hint = getattr(config, name, None), _without_none(hint)
        if value is None:
            continue
        if typing.get_origin(hint) is Literal:
            _choice(typing.get_args(hint), value, _dotted(where, name))
        elif typing.get_origin(hint) is tuple and typing.get_args(hint)[1:] == (Ellipsis,):
            item = typing.get_args(hint)[0]
            if typing.get_origin(item) is Literal:
                for i, v in enumerate(value):
                    _choice(typing.get_args(item), v, f"{_dotted(where, name)}[{i}]")


# ---------------------------------------------------------------- files, overrides, paths


def read_yaml(path: str, what: str = "config file") -> Any:
    """The parsed YAML at `path`; a missing file or bad YAML is a ConfigError naming `what`."""
    import yaml

    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None


def set_dotted(cls: type, data: dict, dotted: str, value: Any, *, what: str = "key") -> None:
    """Set the field at `dotted` (e.g. "sae.k") in `data`, plain data for dataclass `cls`.

    Each part must name a field of its section, and each part but the last a section: a nested
    settings dataclass, or a free-form mapping below which any key goes. Sections missing on the
    way are created (a run file may leave out `train:`). `what` says where the key came from
    ("--set", "space key") in the error, e.g. `--set 'sae.k.x': 'k' is not a config section`.
    """
    parts = dotted.split(".") if isinstance(dotted, str) else [""]
    if not all(parts):
        raise ConfigError(f"{what} {dotted!r}: expected dot-separated field names, e.g. sae.k")
    node, tp = data, cls
    for i, part in enumerate(parts):
        section = ".".join(parts[:i]) or cls.__name__
        if not isinstance(node, dict):
            raise ConfigError(f"{what} {dotted!r}: {section} is {node!r}, not a mapping")
        if dataclasses.is_dataclass(tp):
            if part not in {f.name for f in dataclasses.fields(tp)}:
                raise ConfigError(f"{what} {dotted!r}: {part!r} is not a field of {section}")
            tp = _without_none(typing.get_type_hints(tp)[part])
        else:  # a free-form mapping: any key, typed as its values
            tp = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        if i == len(parts) - 1:
            node[part] = value
            return
        if not (dataclasses.is_dataclass(tp) or dict in (tp, typing.get_origin(tp))):
            raise ConfigError(f"{what} {dotted!r}: {part!r} is not a config section")
        if node.get(part) is None:
            node[part] = {}
        node = node[part]


def with_absolute_paths(config: T) -> T:
    """`config` with every relative local `Location` made absolute, in nested settings too:
    Ray workers and Tune trials run in other working directories."""
    from raysae.data.storage import absolute

    hints = typing.get_type_hints(type(config), include_extras=True)
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if _is_location(hints[f.name]) and value:
            changes[f.name] = absolute(value)
        elif dataclasses.is_dataclass(value):
            changes[f.name] = with_absolute_paths(value)
    return dataclasses.replace(config, **changes) if changes else config


def _is_location(hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_location(arg) for arg in typing.get_args(hint))
    return typing.get_origin(hint) is Annotated and _LOCATION in hint.__metadata__


# ---------------------------------------------------------------- command-line options


def field_help(cls: type) -> dict[str, str]:
    """Field name → the docstring under it in `cls` or a dataclass it inherits from."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(FIELD_DOCS.get(_key(klass), {}))
    return docs


def _key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _argparse_kind(hint: Any) -> dict[str, Any]:
    """argparse keywords for a field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is tuple:
        return {"nargs": "+", "type": args[0]}
    if origin is Literal:
        return {"choices": list(args)}
    if origin in (typing.Union, types.UnionType):
        return _argparse_kind(_without_none(hint))
    return {"type": hint}


@dataclass(frozen=True)
class Options:
    """Command-line options for the fields of a settings dataclass: `--n-tokens` for
    `n_tokens`, its docstring as help; `add` puts them on a parser, `values` reads them back."""

    settings: type
    """The settings dataclass."""
    fields: Sequence[str] | None = None
    """The fields that get an option, in this order; None: every field, required ones first."""
    rename: Mapping[str, str] = field(default_factory=dict)
    """Field → option name where they differ, e.g. n_tokens → splice_tokens (--splice-tokens)."""
    unset: bool = False
    """Every option defaults to None, "not given", and none is required: the caller fills in
    what is not given (e.g. from a dataset's manifest). The help still shows the field's default."""

    def add(self, parser: Any) -> Any:
        """Add the options to `parser` (or an argument group); returns it."""
        cls = self.settings
        hints, docs = typing.get_type_hints(cls), field_help(cls)
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        if self.fields is None:
            chosen = sorted(by_name.values(), key=lambda f: f.default is not dataclasses.MISSING)
        else:
            chosen = [by_name[name] for name in self.fields]
        for f in chosen:
            kwargs: dict[str, Any] = {"dest": self.dest(f.name), "help": docs.get(f.name, "")}
            kwargs["help"] = kwargs["help"].replace("%", "%%")
            if f.default not in (dataclasses.MISSING, None):
                kwargs["help"] += f" (default: {str(f.default).replace('%', '%%')})"
            if self.unset:
                kwargs["default"] = None
            elif f.default is dataclasses.MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = f.default
            parser.add_argument(self.flag(f.name), **kwargs, **_argparse_kind(hints[f.name]))
        return parser

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """Field → its option's value in parsed `args` (None where not given, with `unset`)."""
        names = self.fields or [f.name for f in dataclasses.fields(self.settings)]
        return {name: getattr(args, self.dest(name)) for name in names}

    def dest(self, name: str) -> str:
        """The argparse destination of field `name`'s option."""
        return self.rename.get(name, name)

    def flag(self, name: str) -> str:
        """The option string of field `name`, e.g. `--splice-tokens`."""
        return "--" + self.dest(name).replace("_", "-")


# ---------------------------------------------------------------- development time only


DOCUMENTED_MODULES = (
    "raysae.config",
    "raysae.harvest",
    "raysae.splice_config",
    "raysae.sweep_spec",
    "raysae.text",
)
"""Modules whose settings dataclasses go into the table."""


def extract_field_docs(cls: type) -> dict[str, str]:
    """Field name → the string literal right below its annotation in `cls`'s own body, read
    from source. Development time only (the table's generator and its sync test)."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = following.value.value
    return docs


def documented_classes() -> list[type]:
    """Every dataclass defined in DOCUMENTED_MODULES, in module and definition order."""
    import importlib
    import inspect

    classes = []
    for name in DOCUMENTED_MODULES:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if dataclasses.is_dataclass(obj) and obj.__module__ == name:
                classes.append(obj)
    return sorted(classes, key=_key)


def current_table() -> dict[str, dict[str, str]]:
    """The table as the source code has it now."""
    table = {_key(cls): extract_field_docs(cls) for cls in documented_classes()}
    return {key: docs for key, docs in table.items() if docs}


def render_table(table: dict[str, dict[str, str]]) -> str:
    """Source text of raysae/field_docs.py holding `table`."""
    lines = [
        '"""Field help texts of raysae\'s settings dataclasses: the docstring under each field.',
        "",
        "Generated by `python -m raysae.settings` from the source; do not edit by hand",
        '(tests/test_settings.py checks it matches). See raysae.settings for why it exists."""',
        "",
        "FIELD_DOCS: dict[str, dict[str, str]] = {",
    ]
    for key, docs in table.items():
        lines.append(f"    {key!r}: {{")
        lines.extend(f"        {name!r}: {doc!r}," for name, doc in docs.items())
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from pathlib import Path

    target = Path(__file__).with_name("field_docs.py")
    target.write_text(render_table(current_table()), encoding="utf-8")
    print(f"wrote {target}")
