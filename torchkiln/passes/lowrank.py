"""``lowrank``: factor Linear and Conv2d weights by truncated SVD into two smaller layers.

Linear ``W`` [out, in] = ``U S Vᵀ`` keeps rank ``r``: ``x → (√S_r V_rᵀ) x → (U_r √S_r) · + b``, two
Linear layers with ``r (in + out)`` weights instead of ``in · out``.

Conv2d ``W`` [out, in, kh, kw] (groups = 1), two forms:

* ``channel``: ``W`` as [out, in·kh·kw] → a conv ``in → r`` with the full kernel, then a 1×1 conv
  ``r → out`` carrying the bias;
* ``spatial``: ``W`` as [in·kh, out·kw] → a ``kh×1`` conv ``in → r`` (vertical stride, padding,
  dilation) then a ``1×kw`` conv ``r → out`` (horizontal ones), since
  ``W[o, i, h, w] = Σ_r A[r, i, h] B[o, r, w]``.

The rank is the smallest keeping ``energy`` of ``Σ σ²`` or, with ``rank_ratio``, that share of the
full rank. A layer is left alone, with a note, when the factored form would not have fewer
weights (and so fewer MACs). ``energy=1`` keeps every layer whole: the identity.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Literal

import torch
from torch import fx

from torchkiln.compiler import graph as G
from torchkiln.compiler.options import option
from torchkiln.compiler.passes import Pass, PassConfig, PassResult, register_pass
from torchkiln.compiler.program import Program
from torchkiln.compiler.verify import Tolerance
from torchkiln.passes.layers import Layer, find_layers, ignored
from torchkiln.passes.promise import check_min_cosine, min_cosine_option, promise

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class LowRankConfig(PassConfig):
    energy: float = option(0.9, "keep the smallest rank holding this share of sum(sigma^2), in (0, 1]")
    rank_ratio: float | None = option(None, "instead of energy: keep this share of the full rank, in (0, 1]")
    conv: Literal["channel", "spatial", "off"] = option("channel", "how Conv2d layers are factored")
    ignore: tuple[str, ...] = option((), "module paths (globs) never factored")
    min_cosine: float | None = min_cosine_option()

    def validate(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            self.fail("energy", f"must be in (0, 1], got {self.energy}")
        if self.rank_ratio is not None and not 0.0 < self.rank_ratio <= 1.0:
            self.fail("rank_ratio", f"must be in (0, 1], got {self.rank_ratio}")
        if self.rank_ratio is not None and "energy" in self.changed():
            self.fail("rank_ratio", "give energy or rank_ratio, not both")
        check_min_cosine(self)


@register_pass
class FactorizeLowRank(Pass):
    """Truncated-SVD factorization of Linear and Conv2d layers into two smaller layers."""

    name = "lowrank"
    Config = LowRankConfig
    lossless = False
    config: LowRankConfig

    def tolerance(self) -> Tolerance | None:
        return promise(self.config.min_cosine)

    def run(self, program: Program) -> PassResult:
        work = copy.deepcopy(program.graph_module)
        layers, notes = find_layers(work)
        factored = before = after = 0
        for layer in layers:
            reason = self._why_not(layer)
            if reason:
                if reason != "-":
                    notes.append(f"{layer.name}: not factored, {reason}")
                continue
            weight = G.get_attr_value(work, str(layer.weight.target)).detach()  # type: ignore[union-attr]
            matrix = _as_matrix(weight, self.config.conv if layer.kind == "conv" else "linear")
            rank = self._rank(torch.linalg.svdvals(matrix.double()))
            full, low = weight.numel(), rank * sum(matrix.shape)
            if low >= full:
                notes.append(f"{layer.name}: not factored, rank {rank} of {min(matrix.shape)} saves nothing")
                continue
            _factor(work, layer, matrix, rank, self.config.conv)
            factored, before, after = factored + 1, before + full, after + low
            notes.append(f"{layer.name}: rank {rank} of {min(matrix.shape)}, {full:,} -> {low:,} weights")
        if not factored:
            return PassResult(modified=False, stats={"factored": 0}, notes=notes)
        work.graph.eliminate_dead_code()
        G.drop_unused_attributes(work)
        program.graph_module = work
        return PassResult(True, {"factored": factored, "weights_before": before, "weights_after": after}, notes)

    def _why_not(self, layer: Layer) -> str | None:
        if layer.weight is None:
            return "-"  # a matmul of two activations has nothing to factor
        if ignored(layer, self.config.ignore):
            return "named in ignore"
        if layer.kind == "conv":
            if self.config.conv == "off":
                return "conv=off"
            args: Any = layer.node.args
            if layer.node.target is not aten.conv2d.default or (len(args) > 6 and args[6] != 1):
                return "only ungrouped Conv2d with numeric padding is factored"
        return None

    def _rank(self, singular: torch.Tensor) -> int:
        if self.config.rank_ratio is not None:
            return max(1, math.ceil(self.config.rank_ratio * singular.numel()))
        energy = torch.cumsum(singular**2, 0) / (singular**2).sum().clamp(min=1e-30)
        return min(int(torch.searchsorted(energy, self.config.energy - 1e-12)) + 1, singular.numel())


def _as_matrix(weight: torch.Tensor, form: str) -> torch.Tensor:
    if form == "spatial":  # [in*kh, out*kw]
        out, inp, kh, kw = weight.shape
        return weight.permute(1, 2, 0, 3).reshape(inp * kh, out * kw)
    return weight.reshape(weight.shape[0], -1)  # linear / channel: [out, in*kh*kw]


def _factor(gm: fx.GraphModule, layer: Layer, matrix: torch.Tensor, rank: int, conv_form: str) -> None:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    root = s[:rank].sqrt()
    left, right = u[:, :rank] * root, root[:, None] * vh[:rank]  # matrix ≈ left @ right
    weight = G.get_attr_value(gm, str(layer.weight.target))  # type: ignore[union-attr]
    args: Any = layer.node.args
    x, bias = args[0], args[2] if len(args) > 2 else None
    dtype = weight.dtype
    first_args: tuple[Any, ...]
    second_args: tuple[Any, ...]
    if layer.kind == "linear":
        first, second = right, left  # x → right x → left (right x) + b
        op, first_args, second_args = aten.linear.default, (), ()
    else:
        out, inp, kh, kw = weight.shape
        stride, padding, dilation = (_pair(args[i] if len(args) > i else d) for i, d in ((3, 1), (4, 0), (5, 1)))
        op = aten.conv2d.default
        if conv_form == "channel":
            first, second = right.reshape(rank, inp, kh, kw), left.reshape(out, rank, 1, 1)
            first_args, second_args = (stride, padding, dilation, 1), ((1, 1), (0, 0), (1, 1), 1)
        else:  # spatial
            first = left.T.reshape(rank, inp, kh, 1)
            second = right.reshape(rank, out, kw).permute(1, 0, 2).reshape(out, rank, 1, kw)
            first_args = ((stride[0], 1), (padding[0], 0), (dilation[0], 1), 1)
            second_args = ((1, stride[1]), (0, padding[1]), (1, dilation[1]), 1)
    with gm.graph.inserting_before(layer.node):
        w1 = gm.graph.get_attr(G.add_attribute(gm, f"{layer.name}_low1", first.to(dtype).contiguous(), True))
        w2 = gm.graph.get_attr(G.add_attribute(gm, f"{layer.name}_low2", second.to(dtype).contiguous(), True))
        hidden = gm.graph.call_function(op, (x, w1, None, *first_args))
        output = gm.graph.call_function(op, (hidden, w2, bias, *second_args))
    output.meta = dict(layer.node.meta)
    layer.node.replace_all_uses_with(output)
    gm.graph.erase_node(layer.node)


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = list(value)
    return (int(values[0]), int(values[-1]))
