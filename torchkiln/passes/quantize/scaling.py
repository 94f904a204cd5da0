"""Per-input-channel scaling of Linear groups, shared by AWQ and SmoothQuant.

Linears that read the same input form a group. :class:`Stats` runs the float graph over calibration
batches and keeps, per group input, the sum and the maximum of ``|x|`` per channel, the row count and
a uniform sample of rows. :func:`apply` multiplies the group's weights' input columns by ``s`` and
divides the input by ``s`` — folded into the op that produces it where every reader of it is in the
group (a LayerNorm's / RMSNorm's weight, a Linear's output rows, through a ReLU, one factor of a
product), else (when allowed) an elementwise multiply inserted before the group. The float function
is unchanged either way. Under torchrun :func:`gather` adds sums and row counts and takes maxima over
the ranks, so every rank scales alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx

from torchkiln.compiler import graph as G
from torchkiln.passes.layers import Layer

aten = torch.ops.aten
#: calibration rows kept per group (a uniform sample of all rows) to measure a search's error
SAMPLE = 512


def groups_of(layers: Sequence[Layer]) -> dict[fx.Node, list[Layer]]:
    """The layers by the node they read (graph order)."""
    groups: dict[fx.Node, list[Layer]] = {}
    for layer in layers:
        source = layer.node.args[0]
        if isinstance(source, fx.Node):
            groups.setdefault(source, []).append(layer)
    return groups


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else 0.0


def label(group: list[Layer]) -> str:
    return group[0].name + (f" (+{len(group) - 1})" if len(group) > 1 else "")


def run_share(interpreter: fx.Interpreter, batches: Iterable[tuple[torch.Tensor, ...]], rank: int, world: int) -> None:
    """Runs ``interpreter`` on this rank's share of the batches (r, r + world, ...), without gradients."""
    with torch.no_grad():
        for index, batch in enumerate(batches):
            if index % world == rank:
                interpreter.run(*batch)


def collect(
    gm: fx.GraphModule, groups: dict[fx.Node, list[Layer]], batches: Iterable[tuple[torch.Tensor, ...]],
    rank: int = 0, world: int = 1,
) -> Stats:  # fmt: skip
    """One float pass (this rank's share of the batches); with ``world`` > 1, gathered over the ranks."""
    stats = Stats(gm, {node.name for node in groups})
    run_share(stats, batches, rank, world)
    if world > 1:
        gather(gm, stats, groups)
    return stats


class Stats(fx.Interpreter):
    """Runs the float graph; per watched input: the sum and the maximum of |x| per channel, the row
    count, and a uniform sample of rows (reservoir sampling with a fixed seed)."""

    def __init__(self, gm: fx.GraphModule, inputs: set[str]):
        super().__init__(gm)
        self.inputs = inputs
        self.sums: dict[str, torch.Tensor] = {}
        self.maxima: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.samples: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(0)

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.inputs and isinstance(value, torch.Tensor) and value.is_floating_point():
            flat = value.detach().reshape(-1, value.shape[-1]).float()
            magnitude = flat.abs()
            self.sums[n.name] = self.sums.get(n.name, 0) + magnitude.double().sum(0)  # type: ignore[operator]
            peak = magnitude.amax(0)
            self.maxima[n.name] = torch.maximum(self.maxima[n.name], peak) if n.name in self.maxima else peak
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


def apply(
    gm: fx.GraphModule, source: fx.Node, group: list[Layer], s: torch.Tensor, tag: str, insert: bool = True
) -> str | None:
    """Weights' input columns times ``s``, the input divided by ``s`` (folded, or a multiply when
    ``insert``); returns how the input was divided, or None (nothing changed) when it could not be."""
    readers = {layer.node for layer in group}
    plan = _fold_plan(gm, source, s.shape[0]) if set(source.users) <= readers else None
    if plan is None and not insert:
        return None
    for layer in group:
        weight = G.get_attr_value(gm, str(layer.weight.target)).detach().float()  # type: ignore[union-attr]
        _set_argument(gm, layer.node, 1, weight * s[None, :], f"{layer.name}_{tag}_weight")
    inverse = 1.0 / s
    if plan is not None:
        where, changes = plan
        for change in changes:
            change(inverse)
        return f"folded into {where}"
    with gm.graph.inserting_after(source):
        attr = gm.graph.get_attr(G.add_attribute(gm, f"{group[0].name}_{tag}_inverse", inverse, parameter=False))
    with gm.graph.inserting_after(attr):
        scaled = gm.graph.call_function(aten.mul.Tensor, (source, attr))
    scaled.meta = dict(source.meta)
    for node in readers:
        node.replace_input_with(source, scaled)
    return "kept as a multiply before"


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


#: norms whose output is ``weight * normalized + bias`` per channel (batch norm: in eval, as the IR runs)
_AFFINE_NORMS = (
    torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm,
    *((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ()),
)  # fmt: skip
_RELUS = {aten.relu.default, torch.relu, torch.nn.functional.relu}
Change = Callable[[torch.Tensor], None]


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), torch.nn.ReLU)
    return node.op == "call_function" and node.target in _RELUS and not node.kwargs.get("inplace", False)


def _single_reader(node: Any, reader: fx.Node) -> bool:
    return isinstance(node, fx.Node) and set(node.users) == {reader}


def _scale_argument(gm: fx.GraphModule, node: fx.Node, index: int, rows: bool) -> Change:
    def change(inverse: torch.Tensor) -> None:
        value = _stored(gm, node.args[index])
        assert value is not None
        _set_argument(gm, node, index, value * (inverse[:, None] if rows else inverse), f"{node.name}_scaled_{index}")

    return change


def _fold_plan(gm: fx.GraphModule, node: fx.Node, width: int) -> tuple[str, list[Change]] | None:
    """How ``node``'s output channels (last dim) can be divided through its own stored tensors: (what
    absorbs it, the changes to make with the inverse), or None where nothing can."""
    if node.target == aten.linear.default:
        weight = _stored(gm, node.args[1])
        if weight is None or weight.shape[0] != width:
            return None
        changes = [_scale_argument(gm, node, 1, rows=True)]
        if len(node.args) > 2 and _stored(gm, node.args[2]) is not None:
            changes.append(_scale_argument(gm, node, 2, rows=False))
        return "the rows of the linear before", changes
    if node.target == aten.layer_norm.default and len(node.args) > 2:
        weight = _stored(gm, node.args[2])
        if weight is None or weight.shape != (width,):
            return None
        changes = [_scale_argument(gm, node, 2, rows=False)]
        if len(node.args) > 3 and _stored(gm, node.args[3]) is not None:
            changes.append(_scale_argument(gm, node, 3, rows=False))
        return "a norm's weight", changes
    if _is_relu(gm, node) and _single_reader(node.args[0], node):  # relu(z) / s = relu(z / s), s > 0
        inner = _fold_plan(gm, node.args[0], width)  # type: ignore[arg-type]
        return None if inner is None else (f"{inner[0]}, through a ReLU", inner[1])
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        weight = getattr(module, "weight", None)
        if (isinstance(module, _AFFINE_NORMS) and isinstance(weight, torch.Tensor) and weight.shape == (width,)
                and G.call_module_count(gm, str(node.target)) == 1):  # fmt: skip

            def change(inverse: torch.Tensor) -> None:
                with torch.no_grad():  # the pass works on its own copy of the graph module
                    for tensor in (module.weight, getattr(module, "bias", None)):
                        if isinstance(tensor, torch.Tensor):
                            tensor.mul_(inverse.to(tensor.dtype))

            return "a norm's weight", [change]
        return None
    if node.target == aten.mul.Tensor and len(node.args) == 2:
        for index, arg in enumerate(node.args):
            value = _stored(gm, arg)
            if value is not None and value.shape == (width,) and len(arg.users) == 1:  # type: ignore[union-attr]
                return "a norm's weight", [_scale_argument(gm, node, index, rows=False)]
        for arg in node.args:  # a product's factor made by a linear read only here (silu(gate) * up)
            if _single_reader(arg, node) and arg.target == aten.linear.default:  # type: ignore[union-attr]
                inner = _fold_plan(gm, arg, width)  # type: ignore[arg-type]
                if inner is not None:
                    return "the rows of a product's linear factor", inner[1]
    return None


def gather(gm: fx.GraphModule, stats: Stats, groups: dict[fx.Node, list[Layer]]) -> None:
    """Sums and row counts added, maxima taken over the ranks, input by input in graph order."""
    import torch.distributed as dist

    sources = list(groups)
    rows = torch.tensor([stats.rows.get(node.name, 0) for node in sources], dtype=torch.float64)
    dist.all_reduce(rows)
    for node, count in zip(sources, rows.tolist()):
        if count == 0:
            continue
        width = G.get_attr_value(gm, str(groups[node][0].weight.target)).shape[1]  # type: ignore[union-attr]
        total = stats.sums.get(node.name, torch.zeros(width, dtype=torch.float64))
        peak = stats.maxima.get(node.name, torch.zeros(width)).float()
        dist.all_reduce(total)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        stats.sums[node.name], stats.maxima[node.name], stats.rows[node.name] = total, peak, int(count)
