"""The checks a public function makes on its arguments before any work: a wrong type or value is a
:class:`~torchkiln.errors.ConfigError` naming the argument (Python's own ``TypeError: 'float' object
is not iterable`` from deep inside says neither which argument nor what it should be).

Each returns the value it accepted, so a door reads ``stages = integer("stages", stages)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from torchkiln.errors import ConfigError, KilnError


def integer(
    setting: str, value: Any, low: int = 1, error: type[KilnError] = ConfigError, high: int | None = None
) -> int:
    """``value`` as a count: an int (not a bool, not a float, however whole) in ``[low, high]`` — a
    count that scales time (timed calls, trials) has a ``high`` far past any real use, so that
    10**9 typed for 10 is an error, not a process that never ends."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise error(f"{setting} must be an integer >= {low}, got {value!r}", where=setting)
    if high is not None and value > high:
        raise error(f"{setting}={value} is more than {high:,}", where=setting, hint=f"give at most {high:,}")
    return value


def real(setting: str, value: Any, low: float = 0.0, strict: bool = True, unit: str = "") -> float:
    """A finite real number > ``low`` (>= with ``strict=False``): not a bool, not NaN or infinity (a
    NaN bound turns every comparison off: ``nan < 0`` is False). ``unit`` reads "of seconds"."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or not (value > low if strict else value >= low):
        what = f"a finite number{f' {unit}' if unit else ''} {'>' if strict else '>='} {low:g}"
        raise ConfigError(f"{setting} must be {what}, got {_shown(value)}", where=setting)
    return float(value)


def text(setting: str, value: Any, optional: bool = False) -> Any:
    """A string (or None when ``optional``)."""
    if (value is None and optional) or isinstance(value, str):
        return value
    raise ConfigError(f"{setting} must be a string{' or None' if optional else ''}, got {_shown(value)}", where=setting)


def flag(setting: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{setting} must be True or False, got {_shown(value)}", where=setting)
    return value


def path(setting: str, value: Any, optional: bool = False) -> Any:
    """A path (str or os.PathLike, not empty; or None when ``optional``)."""
    if value is None and optional:
        return value
    if isinstance(value, (str, os.PathLike)) and str(value) and "\x00" not in str(value):
        return value
    raise ConfigError(f"{setting} must be a path{' or None' if optional else ''}, got {_shown(value)}", where=setting)


def strings(setting: str, value: Any) -> list[str]:
    """A list or tuple of strings (a lone string is not one: it would be its characters)."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{setting} must be a list of strings, got {_shown(value)}", where=setting)


def named(setting: str, value: Any) -> Mapping[str, Any]:
    """A mapping with string keys (inputs by name, options)."""
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return value
    raise ConfigError(f"{setting} must be a dict keyed by name, got {_shown(value)}", where=setting)


def integers(setting: str, value: Any, low: int = 1) -> list[int]:
    """A non-empty list or tuple of integers >= ``low``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ConfigError(f"{setting} must be a list of integers >= {low}, got {_shown(value)}", where=setting)
    return [integer(setting, v, low) for v in value]


def _shown(value: Any) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown[:60]}{'...' if len(shown) > 60 else ''}"
