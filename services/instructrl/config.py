"""Typed configuration: nested dataclasses loaded from YAML plus `a.b=c` overrides.

Every service and stage declares a dataclass whose fields carry a `help` string
in their metadata (shown by `instructrl ... --help-config`). Unknown keys and
wrong types raise `ConfigError` naming the dotted field, e.g. `ppo.kl_coef`.

A key that was renamed or moved stays known for one purpose: a config class lists it in
`RENAMED = {"old_key": "where it went"}` (a `ClassVar`), and using it fails with a message
naming the new home instead of a bare "unknown field".
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import types
import typing
from typing import Any, TypeGuard, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that is missing, unknown or of the wrong type; names the field."""


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with a help text (the `--help-config` line)."""
    kw: dict[str, Any] = {"metadata": {"help": help}}
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    elif default is not dataclasses.MISSING:
        kw["default"] = default
    return dataclasses.field(**kw)


def _is_section(tp: Any) -> TypeGuard[type[Any]]:
    """A nested config section: a dataclass type (not an instance)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if _is_section(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if typing.get_origin(tp) is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "", base: Any = None) -> T:
    """Build dataclass `cls` from a (nested) mapping; unknown keys are errors.

    Fields the mapping leaves out keep their defaults: `base`'s values when given, else the
    class's. A nested section given in part starts from its field's default instance (a
    `default_factory` may customise it, e.g. a worker's `sampling` with n=4), not from the
    nested class's own defaults."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    kwargs = {}
    fields = dataclasses.fields(typing.cast(Any, cls))
    names = {f.name for f in fields}
    renamed: dict[str, str] = getattr(cls, "RENAMED", {})
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            if key in renamed:
                raise ConfigError(f"{where}: this key was renamed; use {renamed[key]}")
            raise ConfigError(f"{where}: unknown field (known: {', '.join(sorted(names))})")
    for f in fields:
        if f.name not in data:
            if base is not None:
                kwargs[f.name] = getattr(base, f.name)
            continue
        where = f"{prefix}.{f.name}" if prefix else f.name
        tp, value = hints[f.name], data[f.name]
        if _is_section(tp) and isinstance(value, dict):
            default = getattr(base, f.name) if base is not None else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            kwargs[f.name] = from_dict(tp, value, prefix=where, base=default)
        else:
            kwargs[f.name] = _coerce(tp, value, where)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """The plain-dict form of a config (for YAML dumps and logs)."""
    return dataclasses.asdict(obj)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a mapping")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def load(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Load `cls` from a YAML file (optional) with `a.b=c` overrides applied on top."""
    data: dict[str, Any] = {}
    if path:
        p = pathlib.Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def help_lines(cls: type, prefix: str = "", defaults: Any = None) -> list[str]:
    """`name (type, default): help` lines for every leaf field, dotted.

    `defaults` is the instance whose values are shown (a nested field's own default, which
    may differ from its class's defaults); None = the class's defaults.
    """
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if _is_section(tp):
            if defaults is not None:
                sub = getattr(defaults, f.name)
            elif f.default_factory is not dataclasses.MISSING:
                sub = f.default_factory()
            else:
                sub = None
            out.extend(help_lines(tp, prefix=name + ".", defaults=sub))
            continue
        if defaults is not None:
            default = repr(getattr(defaults, f.name))
        elif f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
        out.append(f"{name} ({tname}, default {default}): {f.metadata.get('help', '')}")
    return out


def parse_cli(prog: str, cls: type[T], argv: list[str], description: str = "", example: str = "") -> T:
    """The command line every role shares: `--config FILE`, `--help-config`, `key=value ...`.

    Returns the loaded config. `--help-config` prints every field and exits 0; a bad
    config prints one line naming the field (`prog: ppo.kl_coef: expected a number`)
    and exits 2, so scripts and Kubernetes see a config error, not a crash.
    """
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Run with --help-config to list every config field.")
    ap.add_argument("--config", help=f"YAML file of {cls.__name__} fields")
    ap.add_argument("--help-config", action="store_true", help="list every config field and exit")
    ap.add_argument("overrides", nargs="*", help=f"dotted key=value overrides{', e.g. ' + example if example else ''}")
    args = ap.parse_args(argv)
    if args.help_config:
        print("\n".join(help_lines(cls)))
        raise SystemExit(0)
    try:
        return load(cls, args.config, args.overrides)
    except (ConfigError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
