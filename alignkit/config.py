"""Typed dataclass configs filled from YAML recipes and dotted command-line overrides.

A config is a tree of dataclasses. Every field has a one-line doc, written either as a comment line directly
above the field or as `field(metadata={"help": ...})`; `config_help` renders them for `--help`.

    cfg = load_config(SFTConfig, "recipe.yaml", ["optim.lr=3e-4", "train.max_steps=100"])

Everything is checked when the config loads, before any work starts: an unknown key names the nearest valid key,
a wrong type names the key, the expected type and the value given. String values may use `${VAR}` and
`${VAR:-default}` to read environment variables (recipes point at data folders this way, never at machine paths).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from alignkit.errors import ConfigError

T = TypeVar("T")

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _OverrideText(str):
    """The raw text of a command-line override: parsed as a YAML scalar unless the field is a string."""


# ---------------------------------------------------------------------------------------------- public API


def load_config(cls: type[T], path: str | Path | None, overrides: typing.Sequence[str] = ()) -> T:
    """Build `cls` from a YAML file (or only defaults when `path` is None), then apply `key.sub=value` overrides."""
    data: dict[str, Any] = {}
    source = str(path) if path is not None else "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist; pass the path of a YAML recipe to --config.")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config sections at the top level, not a {type(loaded).__name__}.")
        data = loaded
    for override in overrides:
        _apply_override(cls, data, override)
    data = _expand_env(data, "")
    return _build(cls, data, prefix="", source=source)


def config_from_dict(cls: type[T], data: dict[str, Any], *, source: str = "<dict>",
                     updates: typing.Mapping[str, Any] | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Build `cls` from a plain dict with the same checks as `load_config`. `updates` set dotted keys to values
    first (a recipe's `fast:` section), then `overrides` apply `key.sub=value` texts (the command line)."""
    data = copy.deepcopy(data)
    for dotted, value in (updates or {}).items():
        _set_path(cls, data, str(dotted), value, source=source)
    for override in overrides:
        _apply_override(cls, data, override)
    return _build(cls, _expand_env(data, ""), prefix="", source=source)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict (lists instead of tuples) that `yaml.safe_dump` writes and `load_config` reads back."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return convert(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (the run directory's `config.yaml`)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_help(cls: type) -> str:
    """Every field of `cls`, nested sections included, with its type, default and one-line doc."""
    lines: list[str] = []
    _help_lines(cls, "", lines)
    return "\n".join(lines)


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> one-line doc: `metadata["help"]`, else the comment lines directly above the field."""
    docs = dict(_comment_docs(cls))
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            docs[f.name] = f.metadata["help"]
    return docs


# ---------------------------------------------------------------------------------------------- building


def _build(cls: type[T], data: Any, *, prefix: str, source: str) -> T:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: {where} must be a mapping of {cls.__name__} fields, got {data!r}."
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = _type_hints(cls)
    for key in data:
        if key not in fields:
            raise _unknown_key(cls, prefix, str(key), source)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            # A section the recipe fills in part keeps the parent's defaults for the rest (PretrainConfig's
            # data section defaults to packing, which a bare DataSection does not).
            value = {**_section_defaults(fields[name]), **value}
        kwargs[name] = _convert(value, tp, key=prefix + name, source=source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # A section's own checks name its keys (`train.batch_size ...`); say which file and, inside a recipe of
        # several configs, which section (`sft.train`) they are about.
        if str(e).startswith(f"{source}:"):
            raise
        named = not prefix or str(e).startswith(where)
        raise ConfigError(f"{source}: {e}" if named else f"{source}: in {where}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{source}: {where}: {e}") from None


def _section_defaults(f: dataclasses.Field) -> dict[str, Any]:
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    elif f.default is not dataclasses.MISSING:
        default = f.default
    else:
        return {}
    # Nested sections come back as dicts, so a section of sections (a whole stage config inside a recipe) merges
    # key by key at every level.
    return config_to_dict(default)


def _convert(value: Any, tp: Any, *, key: str, source: str) -> Any:
    """Check `value` against the type annotation `tp`, converting where YAML's scalars are ambiguous."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if isinstance(value, _OverrideText):
        value = _override_value(str(value), takes_str=tp is str or (origin in (Union, types.UnionType) and str in args))
        source = "command line"  # the value came from `key=value`, whatever the recipe file

    if tp is Any:
        return _parse_overrides(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=key + ".", source=source)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _type_error(key, tp, value, source)
        errors: list[ConfigError] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key=key, source=source)
            except ConfigError as e:
                errors.append(e)
        raise _type_error(key, tp, value, source)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(
            f"{source}: {key} must be one of {', '.join(repr(a) for a in args)}; got {value!r}."
        )
    if origin in (list, tuple):
        if isinstance(value, str):
            # `--key=a,b` is a convenient spelling of a short list on the command line.
            value = [v for v in value.split(",") if v] if "," in value else [value]
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value, source)
        if origin is list:
            item = args[0] if args else Any
            return [_convert(v, item, key=f"{key}[{i}]", source=source) for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], key=f"{key}[{i}]", source=source) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{source}: {key} must have {len(args)} items; got {len(value)}: {value!r}.")
        return tuple(
            _convert(v, a, key=f"{key}[{i}]", source=source)
            for i, (v, a) in enumerate(zip(value, args or [Any] * len(value)))
        )
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _type_error(key, tp, value, source)
        return _parse_overrides(dict(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value, source)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _type_error(key, tp, value, source)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `3e-4` (no dot) as a string; accept it as the float it obviously is.
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, tp, value, source)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _type_error(key, tp, value, source)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _type_error(key, tp, value, source)
    raise ConfigError(f"{source}: {key} has annotation {tp!r}, which the config loader does not support.")


# YAML 1.1's spellings of null; `key=null` means None for every optional field, string fields included.
_NULL_WORDS = frozenset({"null", "Null", "NULL", "~"})


def _override_value(text: str, *, takes_str: bool) -> Any:
    """The value of a command-line override's text. A field that takes strings gets the text as written (no YAML
    surprises: `tokenizer=bpe:512`, `template={{ x }}`), except the null words, which mean None as in a recipe, and
    a quoted scalar, which YAML unquotes (`key="'null'"` for the four-letter string)."""
    if not takes_str:
        return _parse_scalar(text)
    if text in _NULL_WORDS:
        return None
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        parsed = _parse_scalar(text)
        if isinstance(parsed, str):
            return parsed
    return text


def _parse_overrides(value: Any) -> Any:
    """Inside free-form values (dict / Any fields) override texts become YAML scalars."""
    if isinstance(value, _OverrideText):
        return _parse_scalar(str(value))
    if isinstance(value, dict):
        return {k: _parse_overrides(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_parse_overrides(v) for v in value]
    return value


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _type_error(key: str, tp: Any, value: Any, source: str) -> ConfigError:
    # Python's spelling of None is a plain string in YAML; say which word means None.
    hint = " (None is written null)" if value in ("None", "none") else ""
    return ConfigError(
        f"{source}: {key} must be {_type_name(tp)}; got {value!r} ({type(value).__name__}){hint}. Fix the value in "
        "the recipe or override it on the command line."
    )


def _unknown_key(cls: type, prefix: str, key: str, source: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    # A key that exists one level down most likely belongs there (`lr` at the top level means `optim.lr`);
    # otherwise suggest the closest spelling at this level, then one level down.
    hints = _type_hints(cls)
    nested = [
        f"{f.name}.{sub.name}"
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if dataclasses.is_dataclass(hints[f.name])
        for sub in dataclasses.fields(hints[f.name])
    ]
    close = (
        [n for n in nested if n.split(".")[-1] == key][:1]
        or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        or difflib.get_close_matches(key, nested, n=1, cutoff=0.6)
    )
    suggestion = f" Did you mean {prefix}{close[0]!s}?" if close else ""
    return ConfigError(
        f"{source}: unknown config key {prefix}{key!s} ({cls.__name__} has no field {key!r}).{suggestion} "
        f"Valid keys here: {', '.join(valid)}."
    )


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # Each class in the MRO resolves its annotations in its own module (a stage config inherits sections).
    try:
        return typing.get_type_hints(cls)
    except NameError:
        module = inspect.getmodule(cls)
        return typing.get_type_hints(cls, globalns=dict(vars(module)) if module else {})


# ---------------------------------------------------------------------------------------------- overrides, env


def _apply_override(cls: type, data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(
            f"Override {override!r} is not of the form key.sub=value (for example optim.lr=3e-4)."
        )
    dotted, text = override.split("=", 1)
    _set_path(cls, data, dotted.strip().lstrip("-"), _OverrideText(text), source="override")


def _set_path(cls: type, data: dict[str, Any], dotted: str, value: Any, *, source: str) -> None:
    """data[a][b][c] = value for `a.b.c`, checking each key against the dataclass it names."""
    parts = dotted.split(".")
    node: dict[str, Any] = data
    current: Any = cls
    for i, part in enumerate(parts):
        is_last = i == len(parts) - 1
        if dataclasses.is_dataclass(current):
            names = {f.name for f in dataclasses.fields(current)}
            if part not in names:
                raise _unknown_key(current, ".".join(parts[:i]) + "." if i else "", part, source)
            current = _unwrap_optional(_type_hints(current)[part])
        else:
            current = Any  # inside a free-form dict (e.g. model.init.hidden_size)
        if is_last:
            node[part] = value
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def expand_env(text: str, *, key: str = "value") -> str:
    """`${VAR}` -> the variable's value, `${VAR:-default}` -> the value or `default`; unset without a default fails."""

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value is None or value == "":
            if default is None:
                raise ConfigError(
                    f"{key} uses ${{{name}}} but the environment variable {name} is not set; export it "
                    f"or write ${{{name}:-default}}."
                )
            return default
        return value

    return _ENV_PATTERN.sub(replace, text)


def _expand_env(value: Any, key: str) -> Any:
    if isinstance(value, _OverrideText):
        return _OverrideText(expand_env(value, key=key))
    if isinstance(value, str):
        return expand_env(value, key=key)
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


# ---------------------------------------------------------------------------------------------- help


@functools.cache
def _comment_docs(cls: type) -> dict[str, str]:
    """Parse the class source for `# comment` lines directly above `name: type` lines; a field a subclass
    redeclares without a comment (to change its default) keeps its base class's doc."""
    docs: dict[str, str] = {}
    field_line = re.compile(r"^\s+([A-Za-z_][A-Za-z0-9_]*)\s*:")
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        pending: list[str] = []
        own: dict[str, str] = {}
        for line in source.splitlines():
            stripped = line.strip()
            if stripped.startswith("#"):
                pending.append(stripped.lstrip("#").strip())
                continue
            match = field_line.match(line)
            if match and pending:
                own.setdefault(match.group(1), " ".join(pending))
            pending = []
        docs.update(own)
    return docs


def _help_lines(cls: type, prefix: str, lines: list[str], instance: Any = None) -> None:
    """Help lines of `cls`'s fields; defaults come from `instance` when given (a section's default in its parent,
    e.g. the preference stages' own DataSection defaults), else from the field definitions."""
    hints = _type_hints(cls)
    docs = field_docs(cls)
    nested: list[tuple[str, type, Any]] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        if instance is not None:
            default = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        if dataclasses.is_dataclass(tp):
            nested.append((f.name, tp, default if dataclasses.is_dataclass(default) else None))  # type: ignore[arg-type]
            continue
        lines.append(f"  {prefix}{f.name} ({_type_name(tp)}, default {default!r})")
        if docs.get(f.name):
            lines.append(f"      {docs[f.name]}")
    for name, sub, sub_default in nested:
        doc = docs.get(name)
        lines.append("")
        lines.append(f"{prefix}{name}:" + (f"  {doc}" if doc else ""))
        _help_lines(sub, f"{prefix}{name}.", lines, sub_default)
