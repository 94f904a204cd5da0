"""Quantization-aware fine-tuning: the weights trained through their own rounding.

While :func:`fake_quantized` is active, every chosen layer's weight is read through a
parametrization that rounds it to the pass's grid in the forward pass and lets the gradient through
unchanged (the straight-through estimator: ``w + (round(w) - w).detach()``). Training toward the eager
model (:func:`torchkiln.passes.distill.train_graph`) then moves the float weights to where their
rounded values compute what the model did; on exit the parametrizations are removed and the trained
float weights stay, for the pass to round to exactly the values the forward pass used.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from torchkiln.compiler.quant_ops import round_trip_per_channel
from torchkiln.passes.layers import Layer

RoundTrip = Callable[[torch.Tensor], torch.Tensor]


class _Straight(nn.Module):
    def __init__(self, round_trip: RoundTrip):
        super().__init__()
        self.round_trip = round_trip

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.round_trip(weight) - weight).detach()


def per_channel(levels: int) -> RoundTrip:
    """Symmetric int8 per output channel (``levels`` = 127, or 63 for the 7-bit range), as the
    dynamic mode stores weights."""
    return functools.partial(round_trip_per_channel, levels=levels)


@contextlib.contextmanager
def fake_quantized(gm: fx.GraphModule, layers: Sequence[Layer], round_trip: RoundTrip) -> Iterator[None]:
    """The layers' stored weights read through ``round_trip`` with a straight-through gradient."""
    owners: list[tuple[nn.Module, str]] = []
    for layer in layers:
        target = str(layer.weight.target)  # type: ignore[union-attr]
        path, _, name = target.rpartition(".")
        owner = gm.get_submodule(path) if path else gm
        if isinstance(getattr(owner, name, None), nn.Parameter) and not parametrize.is_parametrized(owner, name):
            parametrize.register_parametrization(owner, name, _Straight(round_trip))
            owners.append((owner, name))
    try:
        yield
    finally:
        for owner, name in owners:
            parametrize.remove_parametrizations(owner, name, leave_parametrized=False)
