"""Numeric comparison of outputs against the eager model.

The check is scale-aware: with ``scale = max |reference|`` over an output, it passes when
``max |actual - reference| <= atol + rtol * scale``. An elementwise rtol breaks down on outputs
near zero; relating the error to the output's scale is what "the same model" means in practice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-5
    rtol: float = 1e-4

    def __str__(self) -> str:
        return f"atol={self.atol:g} + rtol={self.rtol:g} x output scale"


FP32 = Tolerance()


@dataclasses.dataclass(frozen=True)
class ErrorStats:
    max_abs: float
    max_rel: float  # max_abs / scale, worst output
    worst_output: int
    allowed: float  # the largest max_abs the tolerance accepts for the worst output

    @property
    def ratio(self) -> float:
        """Error as a fraction of what the tolerance allows (> 1 fails)."""
        if self.max_abs == 0:
            return 0.0
        return self.max_abs / self.allowed if self.allowed > 0 else float("inf")

    def within(self) -> bool:
        return self.ratio <= 1.0


def compare(
    actual: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], tolerance: Tolerance = FP32
) -> ErrorStats:
    """Worst error over all outputs; raises ValueError on structure or shape mismatch."""
    if len(actual) != len(reference):
        raise ValueError(f"{len(actual)} outputs, expected {len(reference)}")
    worst = ErrorStats(0.0, 0.0, 0, tolerance.atol)
    worst_ratio = -1.0
    for i, (a, r) in enumerate(zip(actual, reference)):
        if tuple(a.shape) != tuple(r.shape):
            raise ValueError(f"output {i} has shape {list(a.shape)}, expected {list(r.shape)}")
        a64, r64 = a.detach().cpu().double(), r.detach().cpu().double()
        if r64.numel() == 0:
            continue
        finite = torch.isfinite(r64)
        if not torch.equal(finite, torch.isfinite(a64)):
            return ErrorStats(float("inf"), float("inf"), i, 0.0)
        diff = (a64 - r64)[finite].abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        scale = float(r64[finite].abs().max()) if finite.any() else 0.0
        allowed = tolerance.atol + tolerance.rtol * scale
        ratio = max_abs / allowed
        if ratio > worst_ratio:
            worst_ratio = ratio
            worst = ErrorStats(max_abs, max_abs / scale if scale else max_abs, i, allowed)
    return worst
