"""Per-layer sensitivity and the mixed-precision choice it drives.

The error of a quantized graph is its outputs' relative RMS error against the float graph on a few
calibration batches, ``e = sqrt(sum |y_q - y|^2 / sum |y|^2)``; SQNR is ``-20 log10 e`` dB. A layer's
sensitivity is the error when *only* that layer is quantized. With an error budget, all layers are
quantized, then the most sensitive ones go back to float, one at a time, until the error fits.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from torch import fx

from torchkiln.passes.layers import Layer, find_layers

#: quantize(graph, layers) rewrites a copy of the float graph with ``layers`` quantized.
Quantizer = Callable[[fx.GraphModule, Sequence[Layer]], None]


def sqnr_db(error: float) -> float:
    return math.inf if error == 0 else -20.0 * math.log10(error)


@dataclasses.dataclass
class Evaluator:
    """Relative RMS error of a quantized copy of ``float_graph`` over ``batches``."""

    float_graph: fx.GraphModule
    batches: Sequence[tuple[torch.Tensor, ...]]
    quantize: Quantizer

    def __post_init__(self) -> None:
        with torch.no_grad():
            self.references = [_floats(self.float_graph(*b)) for b in self.batches]

    def error(self, layers: Sequence[Layer]) -> float:
        keys = {layer.key for layer in layers}
        graph = copy.deepcopy(self.float_graph)
        chosen = [layer for layer in find_layers(graph)[0] if layer.key in keys]
        self.quantize(graph, chosen)
        noise = signal = 0.0
        with torch.no_grad():
            for batch, reference in zip(self.batches, self.references):
                for got, want in zip(_floats(graph(*batch)), reference):
                    noise += float(((got.double() - want.double()) ** 2).sum())
                    signal += float((want.double() ** 2).sum())
        return math.sqrt(noise / signal) if signal > 0 else math.sqrt(noise)


def _floats(outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [o for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]


def rank(evaluator: Evaluator, layers: Sequence[Layer]) -> list[tuple[Layer, float]]:
    """(layer, error when only it is quantized), most sensitive first."""
    scored = [(layer, evaluator.error([layer])) for layer in layers]
    return sorted(scored, key=lambda pair: -pair[1])


def fit_budget(
    evaluator: Evaluator, ranked: Sequence[tuple[Layer, float]], budget: float
) -> tuple[list[Layer], list[Layer], float]:
    """(quantized layers, layers kept in float, final error) meeting ``error <= budget`` when it can."""
    kept: list[Layer] = []
    remaining = [layer for layer, _ in ranked]
    error = evaluator.error(remaining)
    while error > budget and remaining:
        kept.append(remaining.pop(0))
        error = evaluator.error(remaining) if remaining else 0.0
    return remaining, kept, error
