"""Typed, self-validating option sets shared by pass configs and backend options.

An option set is a frozen dataclass whose fields are declared once with :func:`option` (default and
description). :meth:`Options.from_mapping` builds one from strings or JSON values (as they come
from a spec like ``prune:ratio=0.5`` or a recipe), coercing by the field's annotation and
rejecting unknown keys with the list of valid ones. Subclasses check ranges in :meth:`validate`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, get_args, get_origin

from torchkiln.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def option(default: Any, doc: str) -> Any:
    """Declare an option field with its default value and a one-line description."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable; use a tuple")
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class Options:
    """Base class of pass configs and backend options."""

    owner: ClassVar[str] = "options"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for out-of-range values. Subclasses override."""

    def fail(self, key: str, message: str) -> None:
        raise ConfigError(f"{self.owner}: option '{key}' {message}", where=f"{self.owner}.{key}")

    @classmethod
    def describe(cls) -> list[tuple[str, str, str, str]]:
        """(name, type, default, description) for every option, for `kiln passes` and docs."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            rows.append((f.name, _type_name(hints[f.name]), repr(f.default), f.metadata.get("doc", "")))
        return rows

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], owner: str | None = None) -> Options:
        owner = owner or cls.owner
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, raw in values.items():
            if key not in names:
                valid = ", ".join(names) or "(none)"
                raise ConfigError(
                    f"{owner}: unknown option '{key}'", where=f"{owner}.{key}", hint=f"valid options: {valid}"
                )
            kwargs[key] = _coerce(raw, hints[key], f"{owner}.{key}")
        try:
            return cls(**kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{owner}: {exc}", where=owner) from exc

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def changed(self) -> dict[str, Any]:
        """Only the options that differ from their defaults (for compact spec strings)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        }


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(raw: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    try:
        if origin in (typing.Union, types.UnionType):
            args = get_args(tp)
            if raw is None or (isinstance(raw, str) and raw.lower() == "none" and type(None) in args):
                if type(None) in args:
                    return None
            for arg in args:
                if arg is type(None):
                    continue
                try:
                    return _coerce(raw, arg, where)
                except ConfigError:
                    continue
            raise ConfigError(f"{where}: {raw!r} is not a valid {_type_name(tp)}", where=where)
        if origin is Literal:
            choices = get_args(tp)
            for choice in choices:
                if raw == choice or str(raw) == str(choice):
                    return choice
            raise ConfigError(f"{where}: {raw!r} is not one of {', '.join(map(str, choices))}", where=where)
        if origin is tuple:
            (item,) = get_args(tp)[:1]
            items = raw.split("|") if isinstance(raw, str) else list(raw)
            return tuple(_coerce(x, item, where) for x in items if x != "")
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
                return raw.lower() in _TRUE
            raise ValueError
        if tp is int:
            if isinstance(raw, bool):
                raise ValueError
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(raw)
        if tp is float:
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw)
            if not math.isfinite(value):  # NaN passes every range check written as `not value < x`
                raise ConfigError(f"{where}: must be a finite number, got {raw!r}", where=where)
            return value
        if tp is str:
            if not isinstance(raw, str):
                raise ValueError
            return raw
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {raw!r}", where=where) from None
    raise ConfigError(f"{where}: unsupported option type {tp!r}", where=where)
