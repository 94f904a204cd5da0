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
group: a LayerNorm's weight and bias, an RMSNorm's weight multiply, a Linear's output rows (also
through a ReLU, or one factor of a product such as Llama's ``silu(gate) * up``). Otherwise an
elementwise multiply by ``1 / s`` is inserted before the group, and the notes name it. Statistics
come from one float pass over the calibration batches (data-parallel under torchrun: sums and
search errors are added over the ranks). AutoAWQ's weight-clipping search is not done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx

from torchkiln.compiler import graph as G
from torchkiln.compiler.quant_ops import block_grid, to_codes
from torchkiln.passes.layers import Layer

aten = torch.ops.aten
#: calibration rows kept per group (a uniform sample of all rows) to measure the search's error
SAMPLE = 512


@dataclasses.dataclass(frozen=True)
class Grid:
    bits: int
    block_size: int
    symmetric: bool

    def round_trip(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` [N, K] rounded to nearest on this grid and back to float."""
        n, k = weight.shape
        blocks = -(-k // self.block_size)
        w = torch.nn.functional.pad(weight, (0, blocks * self.block_size - k)).view(n, blocks, self.block_size)
        scale, zero, low, high = block_grid(w, self.bits, self.symmetric)
        codes = to_codes(w, scale, zero, low, high)
        return ((codes - zero[..., None]) * scale[..., None]).view(n, -1)[:, :k]


class _Stats(fx.Interpreter):
    """Runs the float graph; per watched input: the sum of |x| per channel, the row count, and a
    uniform sample of rows (reservoir sampling with a fixed seed)."""

    def __init__(self, gm: fx.GraphModule, inputs: set[str]):
        super().__init__(gm)
        self.inputs = inputs
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.samples: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(0)

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.inputs and isinstance(value, torch.Tensor) and value.is_floating_point():
            flat = value.detach().reshape(-1, value.shape[-1]).float()
            self.sums[n.name] = self.sums.get(n.name, 0) + flat.abs().double().sum(0)  # type: ignore[operator]
            seen = self.rows.get(n.name, 0)
            self.rows[n.name] = seen + flat.shape[0]
            self._sample(n.name, flat, seen)
        return value

    def _sample(self, name: str, flat: torch.Tensor, seen: int) -> None:
        kept = self.samples.get(name)
        room = SAMPLE - (0 if kept is None else kept.shape[0])
        if room > 0:
            taken = flat[:room]
            self.samples[name] = taken.clone() if kept is None else torch.cat([kept, taken])
            flat, seen = flat[room:], seen + taken.shape[0]
        if flat.shape[0]:
            # row t (0-based, overall) replaces slot r ~ U[0, t] when r < SAMPLE: each row equally likely kept
            slots = (torch.rand(flat.shape[0], generator=self.generator, dtype=torch.float64)
                     * torch.arange(seen + 1, seen + 1 + flat.shape[0], dtype=torch.float64)).long()  # fmt: skip
            hit = slots < SAMPLE
            if bool(hit.any()):
                self.samples[name][slots[hit]] = flat[hit]


def scale(
    gm: fx.GraphModule, layers: Sequence[Layer], batches: Iterable[tuple[torch.Tensor, ...]], grid: Grid,
    steps: int, rank: int = 0, world: int = 1,
) -> list[str]:  # fmt: skip
    """Scale each group of ``layers`` sharing an input (weights replaced in ``gm``, the inverse folded
    or inserted); returns the notes."""
    groups: dict[fx.Node, list[Layer]] = {}
    for layer in layers:
        source = layer.node.args[0]
        if isinstance(source, fx.Node):
            groups.setdefault(source, []).append(layer)
    stats = _Stats(gm, {node.name for node in groups})
    with torch.no_grad():
        for index, batch in enumerate(batches):
            if index % world == rank:
                stats.run(*batch)
    if world > 1:
        _sum_over_ranks(gm, stats, list(groups), groups)
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
        s = _scales(mean, alpha)
        for layer, weight in zip(group, weights):
            _set_argument(gm, layer.node, 1, weight * s[None, :], f"{layer.name}_awq_weight")
        how = _fold(gm, source, group, 1.0 / s)
        folded.setdefault(how, []).append(group[0].name + (f" (+{len(group) - 1})" if len(group) > 1 else ""))
    changed = sum(1 for a in alphas if a > 0)
    notes = [
        f"AWQ ({steps} strengths) on {len(layers) - len(missed)} of {len(layers)} layer(s) in {len(alphas)} "
        f"input group(s): {changed} scaled (median strength {_median(alphas):.2f}), {len(alphas) - changed} best "
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


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else 0.0


def _set_argument(gm: fx.GraphModule, node: fx.Node, index: int, value: torch.Tensor, name: str) -> None:
    """``node.args[index]`` replaced by a new stored tensor (the old one may be shared: a tied weight)."""
    old = node.args[index]
    parameter = isinstance(old, fx.Node) and isinstance(G.get_attr_value(gm, str(old.target)), torch.nn.Parameter)
    with gm.graph.inserting_before(node):
        attr = gm.graph.get_attr(G.add_attribute(gm, name, value.detach().clone(), parameter=parameter))
    node.update_arg(index, attr)


def _stored(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = G.get_attr_value(gm, str(arg.target))
        return value.detach().float() if isinstance(value, torch.Tensor) else None
    return None


def _fold(gm: fx.GraphModule, source: fx.Node, group: list[Layer], inverse: torch.Tensor) -> str:
    """Divide ``source``'s output channels by ``s`` where an op can absorb it; else insert a multiply.
    Returns how (for the notes)."""
    readers = {layer.node for layer in group}
    if set(source.users) <= readers:
        where = _fold_into(gm, source, inverse)
        if where is not None:
            return f"folded into {where}"
    with gm.graph.inserting_after(source):
        attr = gm.graph.get_attr(G.add_attribute(gm, f"{group[0].name}_awq_inverse", inverse, parameter=False))
    with gm.graph.inserting_after(attr):
        scaled = gm.graph.call_function(aten.mul.Tensor, (source, attr))
    scaled.meta = dict(source.meta)
    for node in readers:
        node.replace_input_with(source, scaled)
    return "kept as a multiply before"


_AFFINE_NORMS = (torch.nn.LayerNorm, *((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ()))
_RELUS = {aten.relu.default, torch.relu, torch.nn.functional.relu}


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), torch.nn.ReLU)
    return node.op == "call_function" and node.target in _RELUS and not node.kwargs.get("inplace", False)


def _single_reader(node: Any, reader: fx.Node) -> bool:
    return isinstance(node, fx.Node) and set(node.users) == {reader}


def _fold_into(gm: fx.GraphModule, node: fx.Node, inverse: torch.Tensor) -> str | None:
    """Scale ``node``'s output channels (last dim) by ``inverse`` through its own stored tensors;
    returns what absorbed it, or None where nothing can."""
    width = inverse.shape[0]
    if node.target == aten.linear.default:
        weight = _stored(gm, node.args[1])
        if weight is None or weight.shape[0] != width:
            return None
        _set_argument(gm, node, 1, weight * inverse[:, None], f"{node.name}_awq_rows")
        bias = _stored(gm, node.args[2]) if len(node.args) > 2 else None
        if bias is not None:
            _set_argument(gm, node, 2, bias * inverse, f"{node.name}_awq_bias")
        return "the rows of the linear before"
    if node.target == aten.layer_norm.default and len(node.args) > 2:
        weight = _stored(gm, node.args[2])
        if weight is None or weight.shape != (width,):
            return None
        _set_argument(gm, node, 2, weight * inverse, f"{node.name}_awq_weight")
        bias = _stored(gm, node.args[3]) if len(node.args) > 3 else None
        if bias is not None:
            _set_argument(gm, node, 3, bias * inverse, f"{node.name}_awq_bias")
        return "a norm's weight"
    if _is_relu(gm, node) and _single_reader(node.args[0], node):  # relu(z) / s = relu(z / s), s > 0
        return "the linear before the ReLU" if _fold_into(gm, node.args[0], inverse) else None  # type: ignore[arg-type]
    if node.op == "call_module" and G.call_module_count(gm, str(node.target)) == 1:
        module = gm.get_submodule(str(node.target))
        weight = getattr(module, "weight", None)
        if isinstance(module, _AFFINE_NORMS) and isinstance(weight, torch.Tensor) and weight.shape == (width,):
            with torch.no_grad():  # the pass works on its own copy of the graph module
                weight.mul_(inverse.to(weight.dtype))
                bias = getattr(module, "bias", None)
                if isinstance(bias, torch.Tensor):
                    bias.mul_(inverse.to(bias.dtype))
            return "a norm's weight"
        return None
    if node.target == aten.mul.Tensor and len(node.args) == 2:
        for index, arg in enumerate(node.args):
            value = _stored(gm, arg)
            if value is not None and value.shape == (width,) and len(arg.users) == 1:  # type: ignore[union-attr]
                _set_argument(gm, node, index, value * inverse, f"{node.name}_awq_weight")
                return "a norm's weight"
        for arg in node.args:  # a product's factor made by a linear read only here (silu(gate) * up)
            if _single_reader(arg, node) and arg.target == aten.linear.default and _fold_into(gm, arg, inverse):  # type: ignore[union-attr,arg-type]
                return "the rows of a product's linear factor"
    return None


def _sum_over_ranks(gm: fx.GraphModule, stats: _Stats, sources: list[fx.Node], groups: dict[fx.Node, list[Layer]]) -> None:
    """Sums and row counts added over the ranks, input by input in graph order."""
    import torch.distributed as dist

    rows = torch.tensor([stats.rows.get(node.name, 0) for node in sources], dtype=torch.float64)
    dist.all_reduce(rows)
    for node, count in zip(sources, rows.tolist()):
        if count == 0:
            continue
        mine = stats.sums.get(node.name)
        if mine is None:
            width = G.get_attr_value(gm, str(groups[node][0].weight.target)).shape[1]  # type: ignore[union-attr]
            mine = torch.zeros(width, dtype=torch.float64)
        dist.all_reduce(mine)
        stats.sums[node.name], stats.rows[node.name] = mine, int(count)
