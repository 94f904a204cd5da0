"""SmoothQuant: activation outliers migrated into the weights before static int8 (Xiao et al., 2022).

Static int8 quantizes an activation with one scale per tensor; a few channels with large values
(LLMs' outlier features) then take the whole range and every other channel rounds to a few levels.
Per group of Linears reading the same input, SmoothQuant divides input channel ``j`` by
``s_j = max|x_j|^alpha / max|W_:j|^(1-alpha)`` and multiplies the weights' column ``j`` by it: the
float function is unchanged, the activation's range flattens, and the weights (int8 per output
channel) take the difference. ``alpha`` is fixed (0.5 in the paper) or searched per group on
``0, 0.1, ..., 0.9`` for the least output error of the int8 group (activation per tensor on the
group's calibration sample, weights per channel).

Only groups whose ``1/s`` folds into the op before (a norm's weight, a Linear's rows, see
:mod:`.scaling`) are smoothed: a multiply left in front of an int8 Linear would be one more float
op between the quantize/dequantize pairs. The others are named in the notes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import fx

from torchkiln.compiler import graph as G
from torchkiln.compiler.quant_ops import round_trip_per_channel
from torchkiln.passes.layers import Layer
from torchkiln.passes.quantize import scaling

SEARCH = tuple(step / 10 for step in range(10))


def smooth(
    gm: fx.GraphModule, layers: Sequence[Layer], batches: Iterable[tuple[torch.Tensor, ...]],
    alpha: float | None, signed: bool, rank: int = 0, world: int = 1,
) -> list[str]:  # fmt: skip
    """Smooth each group of ``layers`` (Linears) sharing an input; ``alpha`` None = searched. Returns the notes."""
    groups = scaling.groups_of(layers)
    stats = scaling.collect(gm, groups, batches, rank, world)
    chosen: list[float] = []
    kept: list[str] = []
    for source, group in groups.items():
        if not stats.rows.get(source.name):
            kept.append(f"{scaling.label(group)} (no calibration input reached it)")
            continue
        peak = stats.maxima[source.name].float()
        weights = [G.get_attr_value(gm, str(layer.weight.target)).detach().float() for layer in group]  # type: ignore[union-attr]
        strength = alpha if alpha is not None else _search(peak, weights, stats.samples.get(source.name), signed, world)
        if strength == 0.0:
            chosen.append(0.0)
            continue
        if scaling.apply(gm, source, group, _scales(peak, weights, strength), "smooth", insert=False) is None:
            kept.append(f"{scaling.label(group)} (no op before it can absorb 1/s)")
            continue
        chosen.append(strength)
    smoothed = sum(1 for a in chosen if a > 0)
    how = f"alpha {alpha:g}" if alpha is not None else f"alpha searched, median {scaling.median(chosen):.1f}"
    notes = [f"SmoothQuant ({how}): {smoothed} of {len(groups)} input group(s) smoothed"]
    if kept:
        notes.append("SmoothQuant: not smoothed: " + ", ".join(kept))
    return notes


def _scales(peak: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_peak = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    s = peak.clamp(min=1e-5) ** alpha / w_peak.clamp(min=1e-5) ** (1 - alpha)
    return torch.where((peak > 0) & (w_peak > 0), s, torch.ones_like(s))


def _fake_int8(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """``x`` through static int8 with its own range (uint8 asymmetric, or int8 symmetric)."""
    if signed:
        step = x.abs().max().clamp(min=1e-12) / 127
        return torch.clamp(torch.round(x / step), -127, 127) * step
    low, high = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
    step = ((high - low) / 255).clamp(min=1e-12)
    zero = torch.round(-low / step)
    return (torch.clamp(torch.round(x / step) + zero, 0, 255) - zero) * step


def _search(
    peak: torch.Tensor, weights: list[torch.Tensor], sample: torch.Tensor | None, signed: bool, world: int
) -> float:
    errors = torch.zeros(len(SEARCH), dtype=torch.float64)
    if sample is not None and sample.shape[0]:
        for index, alpha in enumerate(SEARCH):
            s = _scales(peak, weights, alpha)
            x = _fake_int8(sample / s, signed)
            for w in weights:
                errors[index] += float((x @ round_trip_per_channel(w * s).T - sample @ w.T).pow(2).sum())
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(errors)
    return SEARCH[int(torch.argmin(errors))]
