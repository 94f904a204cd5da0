"""Numeric comparison of outputs against the eager model.

The check is scale-aware: with ``scale = max |reference|`` over an output, it passes when
``max |actual - reference| <= atol + rtol * scale``. An elementwise rtol breaks down on outputs
near zero; relating the error to the output's scale is what "the same model" means in practice.

Quantized models are judged by direction instead: a :class:`Tolerance` with ``min_cosine`` passes
when every output's cosine similarity to the reference (flattened) is at least that floor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from torchkiln.compiler import arguments
from torchkiln.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-5
    rtol: float = 1e-4
    min_cosine: float | None = None  # when set, the check is cosine similarity >= min_cosine

    def __post_init__(self) -> None:
        """A NaN bound turns every comparison off (``error <= nan`` is False, ``not >`` is True):
        refuse it, and every other value that cannot describe a check."""
        for key in ("atol", "rtol"):
            arguments.real(f"tolerance {key}", getattr(self, key), low=0, strict=False)
        floor = self.min_cosine
        if floor is not None and (
            isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 < floor <= 1
        ):
            raise ConfigError(
                f"tolerance min_cosine must be in (0, 1], got {floor!r}", where="tolerance.min_cosine"
            )

    @classmethod
    def given(cls, value: Any, setting: str = "tolerance") -> Tolerance | None:
        """A public door's ``tolerance`` argument: a Tolerance or None, anything else a ConfigError
        (a float reached the first comparison as "'float' object has no attribute 'min_cosine'")."""
        if value is None or isinstance(value, cls):
            return value
        raise ConfigError(f"{setting} must be a torchkiln.Tolerance or None, got {type(value).__name__} {value!r:.60}",
                          where=setting, hint="e.g. Tolerance(atol=1e-4, rtol=1e-3) or Tolerance(min_cosine=0.99)")  # fmt: skip

    def __str__(self) -> str:
        if self.min_cosine is not None:
            return f"cosine similarity >= {self.min_cosine:g}"
        return f"atol={self.atol:g} + rtol={self.rtol:g} x output scale"

    @classmethod
    def parse(cls, text: str) -> Tolerance:
        """The tolerance ``str()`` wrote (a report's or manifest's ``tolerance``); ConfigError otherwise."""
        import re

        cosine = re.fullmatch(r"cosine similarity >= ([0-9.eE+-]+)", text.strip())
        if cosine:
            return cls(min_cosine=float(cosine.group(1)))
        bounds = re.fullmatch(r"atol=([0-9.eE+-]+) \+ rtol=([0-9.eE+-]+) x output scale", text.strip())
        if bounds:
            return cls(atol=float(bounds.group(1)), rtol=float(bounds.group(2)))
        raise ConfigError(f"not a tolerance: {text!r}", where="tolerance",
                          hint="write 'cosine similarity >= 0.99' or 'atol=1e-05 + rtol=0.0001 x output scale'")  # fmt: skip


FP32 = Tolerance()


@dataclasses.dataclass(frozen=True)
class ErrorStats:
    max_abs: float
    max_rel: float  # max_abs / scale, worst output
    worst_output: int
    allowed: float  # the largest max_abs the tolerance accepts for the worst output
    cosine: float = 1.0  # the lowest cosine similarity over the outputs
    min_cosine: float | None = None
    compared: int = 0  # finite reference elements compared, over all outputs

    @property
    def ratio(self) -> float:
        """Error as a fraction of what the tolerance allows (> 1 fails)."""
        if self.min_cosine is not None:
            return _cosine_ratio(self.cosine, self.min_cosine)
        if self.max_abs == 0:
            return 0.0
        return _ratio(self.max_abs, self.allowed)

    def within(self) -> bool:
        return self.ratio <= 1.0


def compare(
    actual: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], tolerance: Tolerance = FP32
) -> ErrorStats:
    """Worst error over all outputs; raises ValueError on structure or shape mismatch."""
    if len(actual) != len(reference):
        raise ValueError(f"{len(actual)} outputs, expected {len(reference)}")
    floor = tolerance.min_cosine
    worst = ErrorStats(0.0, 0.0, 0, tolerance.atol, 1.0, floor)
    worst_ratio, lowest_cosine, compared = -1.0, 1.0, 0
    for i, (a, r) in enumerate(zip(actual, reference)):
        if tuple(a.shape) != tuple(r.shape):
            raise ValueError(f"output {i} has shape {list(a.shape)}, expected {list(r.shape)}")
        a64, r64 = a.detach().cpu().double(), r.detach().cpu().double()
        if r64.numel() == 0:
            continue
        finite = torch.isfinite(r64)
        if not torch.equal(finite, torch.isfinite(a64)):
            return ErrorStats(float("inf"), float("inf"), i, 0.0, 0.0, floor)
        compared += int(finite.sum())
        diff = (a64 - r64)[finite].abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        scale = float(r64[finite].abs().max()) if finite.any() else 0.0
        allowed = tolerance.atol + tolerance.rtol * scale
        cosine = cosine_similarity(a64[finite], r64[finite])
        lowest_cosine = min(lowest_cosine, cosine)
        ratio = _cosine_ratio(cosine, floor) if floor is not None else _ratio(max_abs, allowed)
        if ratio > worst_ratio:
            worst_ratio = ratio
            worst = ErrorStats(max_abs, max_abs / scale if scale else max_abs, i, allowed, cosine, floor)
    return dataclasses.replace(worst, cosine=lowest_cosine, compared=compared)


def cosine_similarity(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Of the flattened tensors; 1.0 when both are zero, 0.0 when only one is."""
    a, r = actual.detach().flatten().double(), reference.detach().flatten().double()
    norms = float(a.norm() * r.norm())
    if norms == 0:
        return 1.0 if float(a.norm()) == float(r.norm()) else 0.0
    return float(torch.dot(a, r)) / norms


def _cosine_ratio(cosine: float, floor: float) -> float:
    if cosine >= 1.0 - 1e-12:  # identical up to the rounding of the dot product
        return 0.0
    return (1.0 - cosine) / (1.0 - floor) if floor < 1.0 else float("inf")


def _ratio(error: float, allowed: float) -> float:
    """``error / allowed``; a tolerance of 0 (atol=0, rtol=0: bit-exact) allows an error of 0 only."""
    if allowed > 0:
        return error / allowed
    return 0.0 if error == 0 else float("inf")
