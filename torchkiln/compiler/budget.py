"""One memory budget for every number a user types that scales an allocation: new tokens x the KV
cache, benchmark batch sizes, random calibration batches, tensor sizes a manifest declares.

Each is priced in bytes and checked *before* anything is allocated: over the budget it is a
:class:`~torchkiln.errors.ConfigError` (a setting) or :class:`~torchkiln.errors.InputError` (a call's
argument) naming the setting, what it would cost and the budget — never a raw ``MemoryError`` after
minutes of work, nor a machine pushed into swap. The budget is ``$TORCHKILN_MEMORY_BUDGET`` (bytes,
or a number with a unit: ``512MiB``, ``16GB``) when set, else the memory the system reports as
available when the check runs (``MemAvailable``; the physical memory where that is unknown).
"""

from __future__ import annotations

import os
import re
from typing import Any

from torchkiln.errors import ConfigError, InputError, KilnError

ENV = "TORCHKILN_MEMORY_BUDGET"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def memory_budget() -> int:
    """The budget in bytes (see the module docstring)."""
    text = os.environ.get(ENV, "").strip()
    if text:
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", text)
        unit = _UNITS.get(match.group(2).lower()) if match else None
        if match is None or unit is None or float(match.group(1)) * unit < 1:
            raise ConfigError(f"{ENV}={text!r} is not a size", where=ENV, hint="write bytes or e.g. 512MiB, 16GB")
        return int(float(match.group(1)) * unit)
    return _available()


def _available() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**63  # unknown: no limit of ours (the allocator's own error stays)


def size_text(count: int) -> str:
    """``1.5 GiB``, ``12.0 MiB``, ``512 B``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def check_allocation(setting: str, value: Any, cost: int, what: str, error: type[KilnError] = InputError) -> None:
    """Refuse ``setting=value`` when ``cost`` bytes (``what`` they hold) exceed the budget."""
    budget = memory_budget()
    if cost <= budget:
        return
    source = f"${ENV}" if os.environ.get(ENV, "").strip() else "the memory available now"
    raise error(
        f"{setting}={value} needs {size_text(cost)} for {what}, over the memory budget of {size_text(budget)} ({source})",
        where=setting,
        hint=f"ask for less, or raise the budget with {ENV}=<size> if the machine has the memory",
    )
