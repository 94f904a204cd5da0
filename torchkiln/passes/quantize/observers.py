"""Activation range calibration: a streaming histogram per tensor and four ways to pick a range.

Memory is bounded by the histogram (2,048 bins per observed tensor), not by the data: a batch is
binned and dropped. The histogram's range always contains zero and the batch's values; when a
batch falls outside it, the range doubles (adjacent bins merge pairwise, so counts stay exact).

Calibrators choose the clipping range ``[lo, hi]`` (``lo <= 0 <= hi`` so zero is exact):

* ``minmax``: the observed minimum and maximum.
* ``percentile``: the ``p`` and ``100 - p`` percentiles of the histogram.
* ``mse``: the range, among ``[max(min, -T), min(max, T)]`` for thresholds ``T = t · max |x|``,
  ``t`` in (0, 1], minimising the expected squared error of quantize-dequantize over the histogram
  (rounding inside, clipping outside). Clipping magnitudes, not scaling both ends, lets a one-sided
  outlier be clipped without cutting into the other side.
* ``entropy``: the same candidates, minimising the KL divergence between the clipped histogram and
  its quantized version (TensorRT's calibrator, generalised to asymmetric ranges). KL alone fails on
  spiky histograms — post-ReLU zeros, outputs pinned at a bias value — where it prefers ranges
  that clip most real values (``[0, 4)`` data cut to ``[0, 1.4]``). So exact zeros (exact in any
  range) are left out of the divergence, and only candidates whose expected squared error is within
  :data:`ENTROPY_ERROR_BOUND` times the smallest compete: entropy is never far worse than ``mse``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

BINS = 2048
#: entropy keeps KL's choice unless its expected squared error is more than this many times the
#: smallest among the candidate ranges (see ``choose_range``)
ENTROPY_ERROR_BOUND = 8.0
_CANDIDATES = torch.linspace(0.05, 1.0, 96, dtype=torch.float64)


@dataclasses.dataclass(frozen=True)
class QParams:
    """Affine quantization ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    dtype: torch.dtype

    @classmethod
    def from_range(cls, lo: float, hi: float, signed: bool) -> QParams:
        """uint8 asymmetric over ``[lo, hi]``, or int8 symmetric (zero point 0) over ``±max``."""
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if signed:
            bound = max(-lo, hi)
            return cls(max(bound / 127.0, 1e-12), 0, -128, 127, torch.int8)
        scale = max((hi - lo) / 255.0, 1e-12)
        zero = int(min(max(round(-lo / scale), 0), 255))
        return cls(scale, zero, 0, 255, torch.uint8)


class Histogram:
    """Streaming histogram of all values seen, over a range that grows by doubling."""

    def __init__(self, bins: int = BINS):
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.low = self.high = 0.0
        self.min, self.max = math.inf, -math.inf
        self.zeros = 0.0  # values exactly 0 (post-ReLU activations, padding): exact in any range

    @property
    def empty(self) -> bool:
        return self.min > self.max

    def update(self, values: torch.Tensor) -> None:
        x = finite_values(values)
        if x.numel() == 0:
            return
        self.extend(float(x.min()), float(x.max()))
        self.add(x)

    def extend(self, lo: float, hi: float) -> None:
        """Grow the range (by doubling) to hold ``[lo, hi]``; the first range also holds zero."""
        if lo > hi:  # nothing finite was seen
            return
        if self.empty:
            self.low, self.high = min(lo, 0.0), max(hi, 0.0)
            if self.high - self.low < 1e-12:
                self.high = self.low + 1e-6
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        while lo < self.low or hi > self.high:
            self._double(downward=lo < self.low)

    def add(self, x: torch.Tensor) -> None:
        """Bin finite values already inside the range (:meth:`extend` first)."""
        self.counts += torch.histc(x, self.bins, self.low, self.high).double()
        self.zeros += float((x == 0).sum())

    def zero_bin(self) -> int:
        """The bin ``histc`` puts 0.0 in."""
        step = (self.high - self.low) / self.bins
        return min(int((0.0 - self.low) / step), self.bins - 1)

    def _double(self, downward: bool) -> None:
        merged = self.counts.view(-1, 2).sum(1)
        pad = torch.zeros_like(merged)
        width = self.high - self.low
        if downward:
            self.counts, self.low = torch.cat([pad, merged]), self.high - 2 * width
        else:
            self.counts, self.high = torch.cat([merged, pad]), self.low + 2 * width

    def centers(self) -> torch.Tensor:
        step = (self.high - self.low) / self.bins
        return self.low + step * (torch.arange(self.bins, dtype=torch.float64) + 0.5)


def finite_values(values: torch.Tensor) -> torch.Tensor:
    x = values.detach().float().flatten()
    return x[torch.isfinite(x)]


def choose_range(hist: Histogram, method: str, percentile: float = 99.99, signed: bool = False) -> tuple[float, float]:
    """The clipping range of ``hist`` by ``method`` (see the module docstring)."""
    if hist.empty:
        return 0.0, 0.0
    lo, hi = min(hist.min, 0.0), max(hist.max, 0.0)
    if method == "minmax":
        return lo, hi
    if method == "percentile":
        return _percentile_range(hist, percentile)
    bound = max(-lo, hi)

    def clipped(t: float) -> tuple[float, float]:  # clip magnitudes above t * max|x|, either side
        return max(lo, -t * bound), min(hi, t * bound)

    candidates = _CANDIDATES.tolist()
    errors = {t: _mse(hist, QParams.from_range(*clipped(t), signed)) for t in candidates}
    if method == "mse":
        return clipped(min(candidates, key=errors.__getitem__))
    # entropy: the lowest KL among ranges whose squared error is within ENTROPY_ERROR_BOUND of the
    # best one (KL alone picks ranges clipping most values when the histogram has spikes)
    floor = min(errors.values())
    allowed = [t for t in candidates if errors[t] <= ENTROPY_ERROR_BOUND * floor] or candidates
    return clipped(min(allowed, key=lambda t: _kl(hist, QParams.from_range(*clipped(t), signed))))


def _percentile_range(hist: Histogram, percentile: float) -> tuple[float, float]:
    cdf = torch.cumsum(hist.counts, 0) / hist.counts.sum()
    edges = hist.centers() + (hist.high - hist.low) / (2 * hist.bins)
    upper = float(edges[int(torch.searchsorted(cdf, percentile / 100.0).clamp(max=hist.bins - 1))])
    lower_index = int(torch.searchsorted(cdf, 1.0 - percentile / 100.0).clamp(max=hist.bins - 1))
    lower = float(edges[lower_index] - (hist.high - hist.low) / hist.bins)
    return min(max(lower, hist.min), 0.0), max(min(upper, hist.max), 0.0)


def _fake_quantize(values: torch.Tensor, q: QParams) -> torch.Tensor:
    return (torch.clamp(torch.round(values / q.scale) + q.zero_point, q.qmin, q.qmax) - q.zero_point) * q.scale


def _mse(hist: Histogram, q: QParams) -> float:
    centers = hist.centers()
    return float((hist.counts * (_fake_quantize(centers, q) - centers) ** 2).sum())


def _kl(hist: Histogram, q: QParams) -> float:
    """KL(P || Q) as TensorRT computes it: P is the histogram inside the range with the mass outside
    piled on its edge bins; Q quantizes the in-range bins alone (no outliers) to the levels and
    spreads each level's mass evenly over its non-empty bins. Clipping shows up as P's edge spikes.

    Values exactly zero are left out of both: zero is exact in every candidate range, so they carry
    no error — but a spike of them (90% zeros after a ReLU on black backgrounds) spread over its
    level's bins in Q dominates the divergence and drives TensorRT's choice to ranges that clip
    most of the real values (0..4 cut to 0..1.4 on such data)."""
    centers = hist.centers()
    counts_all = hist.counts.clone()
    counts_all[hist.zero_bin()] = (counts_all[hist.zero_bin()] - hist.zeros).clamp(min=0)
    lo = (q.qmin - q.zero_point) * q.scale
    hi = (q.qmax - q.zero_point) * q.scale
    inside = ((centers >= lo) & (centers <= hi)).nonzero().flatten()
    if inside.numel() < 2:
        return math.inf
    first, last = int(inside[0]), int(inside[-1])
    counts = counts_all[first : last + 1]
    p = counts.clone()
    p[0] += counts_all[:first].sum()
    p[-1] += counts_all[last + 1 :].sum()
    level = torch.round(centers[first : last + 1] / q.scale).long()
    level = level - level.min()
    nonzero = (counts > 0).double()
    mass = torch.zeros(int(level.max()) + 1, dtype=torch.float64).index_add_(0, level, counts)
    support = torch.zeros_like(mass).index_add_(0, level, nonzero)
    expanded = torch.where(nonzero > 0, mass[level] / support[level].clamp(min=1), torch.zeros_like(p))
    if float(expanded.sum()) == 0 or float(p.sum()) == 0:
        return math.inf
    p, expanded = p / p.sum(), expanded / expanded.sum()
    keep = p > 0
    return float((p[keep] * torch.log(p[keep] / expanded[keep].clamp(min=1e-12))).sum())
