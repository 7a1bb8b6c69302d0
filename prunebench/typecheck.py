"""Type checks for config dataclasses, so a wrong value is one clear line before anything runs.

Grid files and method configs come from YAML and the command line; a string where a number
belongs would otherwise surface as a traceback deep inside a method, hours into a run.
"""
from __future__ import annotations

import dataclasses
import types
import typing

from .errors import UserError


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(tp)) else inner
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
            tuple: "a list", dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def matches(value, tp) -> bool:
    """Does a YAML/JSON value fit annotation `tp`?  Unknown annotations accept anything."""
    if tp is typing.Any or tp is object:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return any(matches(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            args = args[:1]
        if len(args) == 1:
            return all(matches(v, args[0]) for v in value)
        return True
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def check_fields(cls, values: dict, where: str) -> None:
    """Raise UserError naming the first field of dataclass `cls` whose value has the wrong type."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # annotations that cannot be resolved are not checked
        return
    for f in dataclasses.fields(cls):
        if f.name not in values or f.name not in hints:
            continue
        value, tp = values[f.name], hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(value, tp):
            continue
        if not matches(value, tp):
            raise UserError(f"{where}: {f.name} must be {_type_name(tp)}, got {value!r}"[:300],
                            hint=f"default: {_default_text(f)}")


def _default_text(f) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "none (required)"
