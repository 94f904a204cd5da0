"""AWQ: activation-aware weight quantization (Lin et al., 2023).

A few input channels of a layer carry large activations; their weights matter most, and rounding
them costs the most output error. AWQ multiplies the weight's input column ``j`` by ``s_j`` before
rounding and divides the input by ``s_j``: ``x W^T = (x / s) (W s)^T``, so the float function is
unchanged while the salient columns use more of their block's grid. Per group of Linear layers that
read the same input (q/k/v after a norm, gate/up), ``s = mean|x|^alpha`` (normalised so that
``sqrt(max s * min s) = 1``) with ``alpha`` searched on a grid ``0, 1/n, ..., (n-1)/n`` for the least
output error of the rounded group on a sample of calibration rows; ``alpha = 0`` is round to nearest,
so the chosen scaling is never worse than it on that sample.

The ``1 / s`` is folded into the op that produces the input when every reader of it is in the
group, else an elementwise multiply is inserted before the group (:mod:`.scaling`); the notes say
which. Statistics come from one float pass over the calibration batches (data-parallel under
torchrun: sums and search errors are added over the ranks). AutoAWQ's weight-clipping search is not
done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
from torch import fx

from torchkiln.compiler import graph as G
from torchkiln.compiler.quant_ops import round_trip_blocks
from torchkiln.passes.layers import Layer
from torchkiln.passes.quantize import scaling


@dataclasses.dataclass(frozen=True)
class Grid:
    bits: int
    block_size: int
    symmetric: bool

    def round_trip(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` [N, K] rounded to nearest on this grid and back to float."""
        return round_trip_blocks(weight, self.bits, self.block_size, self.symmetric)


def scale(
    gm: fx.GraphModule, layers: Sequence[Layer], batches: Iterable[tuple[torch.Tensor, ...]], grid: Grid,
    steps: int, rank: int = 0, world: int = 1,
) -> list[str]:  # fmt: skip
    """Scale each group of ``layers`` sharing an input (weights replaced in ``gm``, the inverse folded
    or inserted); returns the notes."""
    groups = scaling.groups_of(layers)
    stats = scaling.collect(gm, groups, batches, rank, world)
    alphas: list[float] = []
    folded: dict[str, list[str]] = {}
    missed: list[str] = []
    for source, group in groups.items():
        if not stats.rows.get(source.name):
            missed.extend(layer.name for layer in group)
            continue
        mean = (stats.sums[source.name] / stats.rows[source.name]).float()
        weights = [G.get_attr_value(gm, str(layer.weight.target)).detach().float() for layer in group]  # type: ignore[union-attr]
        alpha = _search(mean, weights, stats.samples.get(source.name), grid, steps, world)
        alphas.append(alpha)
        if alpha == 0.0:
            continue
        how = scaling.apply(gm, source, group, _scales(mean, alpha), "awq")
        folded.setdefault(str(how), []).append(scaling.label(group))
    changed = sum(1 for a in alphas if a > 0)
    notes = [
        f"AWQ ({steps} strengths) on {len(layers) - len(missed)} of {len(layers)} layer(s) in {len(alphas)} "
        f"input group(s): {changed} scaled (median strength {scaling.median(alphas):.2f}), {len(alphas) - changed} best "
        "unscaled (round to nearest)"
    ]
    if missed:
        notes.append(f"AWQ: round to nearest (no calibration input reached them): {', '.join(missed)}")
    for how, names in folded.items():
        notes.append(f"AWQ: 1/s {how}: {', '.join(names)}")
    return notes


def _scales(mean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = mean.clamp(min=1e-4) ** alpha
    return s / torch.sqrt(s.max() * s.min())


def _search(
    mean: torch.Tensor, weights: list[torch.Tensor], sample: torch.Tensor | None, grid: Grid, steps: int, world: int
) -> float:
    """The strength with the least output error of the rounded group on the sample (summed over
    ranks: every rank returns the same); ties keep the smaller strength."""
    errors = torch.zeros(steps, dtype=torch.float64)
    if sample is not None and sample.shape[0]:
        for step in range(steps):
            s = _scales(mean, step / steps)
            for w in weights:
                delta = grid.round_trip(w * s[None, :]) / s[None, :] - w
                errors[step] += float((sample @ delta.T).pow(2).sum())
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(errors)
    return int(torch.argmin(errors)) / steps


