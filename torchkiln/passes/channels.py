"""Structured channel pruning: groups of coupled channels, found in the graph and shrunk together.

A *group* is one channel space: the output channels of one or more producer layers (conv /
linear), every op that carries those channels unchanged, and the layers that consume them. The
group is built by following the producer's output forward:

* element-wise ops, activations, dropout, pooling and spatial means carry the channels through;
* BatchNorm and depthwise convs (``groups == channels``) carry them and own per-channel weights,
  which are sliced too (a depthwise conv ties its input channels to its output channels);
* a residual ``add`` / ``mul`` ties both operands: the other operand is traced back to *its*
  producers, which join the group (every branch must keep the same channels);
* ``flatten(1)`` of ``[N, C, H, W]`` before a Linear maps channel ``c`` to its ``H·W`` columns;
* a ``cat`` along the channel axis makes the group one *segment* of the concatenated channels:
  the consumers behind it lose the kept-out channels of every segment at its offset;
* a conv / linear consuming the tensor loses the matching input channels.

Anything else (reshape, attention, layer norm, a graph output, a grouped conv, a BatchNorm or add
behind a concat) *freezes*
the group: it is left alone with a note naming the op. Channels are ranked by the L1 (or L2) norm
of the producers' filters, summed over producers; ``ratio`` of them go, the kept count rounded up
to a multiple of ``round_to``; weights are sliced so the exported model has the smaller shapes.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, cast

import torch
from torch import fx, nn

from torchkiln.compiler import graph as G
from torchkiln.passes.layers import Layer

aten = torch.ops.aten
F = nn.functional

_UNARY = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.sigmoid, torch.sigmoid, torch.tanh, F.dropout,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.leaky_relu, F.hardtanh, F.elu,
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default,
    aten.hardtanh.default, aten.hardswish.default, aten.max_pool2d.default, aten.avg_pool2d.default,
    aten.adaptive_avg_pool2d.default, aten.dropout.default, aten.clone.default,
}  # fmt: skip
_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Identity,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.LeakyReLU, nn.Hardtanh, nn.ELU,
)  # fmt: skip
_UNARY_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone"}
_BINARY = {operator.add, operator.mul, torch.add, torch.mul, aten.add.Tensor, aten.mul.Tensor}
_MEANS = {torch.mean, aten.mean.dim}
_FLATTENS = {torch.flatten, aten.flatten.using_ints}


class Frozen(Exception):
    """The group cannot be pruned; the message says why."""


@dataclasses.dataclass(eq=False)
class Group:
    producers: list[Layer] = dataclasses.field(default_factory=list)
    # (layer, block size, the concat the channels reach it through, if any)
    consumers: list[tuple[Layer, int, fx.Node | None]] = dataclasses.field(default_factory=list)
    segments: list[tuple[fx.Node, fx.Node]] = dataclasses.field(default_factory=list)  # (cat, its input)
    norms: list[fx.Node] = dataclasses.field(default_factory=list)  # BatchNorm calls
    depthwise: list[Layer] = dataclasses.field(default_factory=list)
    channels: int = 0

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.producers)


class GroupBuilder:
    """Builds the group of one producer (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, layers: list[Layer]):
        self.gm = gm
        self.by_node = {layer.node: layer for layer in layers}
        self._seen: set[fx.Node] = set()  # nodes already followed for the group being built

    def build(self, producer: Layer) -> Group:
        group = Group(channels=_out_channels(self.gm, producer))
        self._seen = set()
        self._add_producer(group, producer)
        return group

    def _add_producer(self, group: Group, layer: Layer) -> None:
        if layer in group.producers:
            return
        if _out_channels(self.gm, layer) != group.channels:
            raise Frozen(f"{layer.name} has {_out_channels(self.gm, layer)} channels, the group {group.channels}")
        if layer.kind == "conv" and groups(layer) != 1:
            raise Frozen(f"{layer.name} is a grouped conv")
        group.producers.append(layer)
        rank = len(G.shape_of(layer.node) or ())
        self._forward(group, layer.node, dim=1 if layer.kind == "conv" else rank - 1, block=1, cat=None)

    def _forward(self, group: Group, node: fx.Node, dim: int, block: int, cat: fx.Node | None) -> None:
        """Follow ``node``: channels on axis ``dim``, ``block`` columns per channel once flattened,
        and ``cat`` the concat they went through (they are then a segment of its channels)."""
        if node in self._seen:
            return
        self._seen.add(node)
        for user in list(node.users):
            self._visit(group, node, user, dim, block, cat)

    def _visit(self, group: Group, node: fx.Node, user: fx.Node, dim: int, block: int, cat: fx.Node | None) -> None:
        rank = len(G.shape_of(node) or ())
        if cat is not None and (self._is_norm(user) or user.target in _BINARY or _is_channel_cat(user, dim)):
            raise Frozen(f"after concat {cat.name} its channels reach {G.op_key(user, self.gm)} ({user.name})")
        layer = self.by_node.get(user)
        if user.op == "output":
            raise Frozen("its channels reach a graph output")
        if layer is not None and user.args[0] is node and layer.kind != "matmul":
            if layer.kind == "conv" and _is_depthwise(self.gm, layer, group.channels) and cat is None:
                group.depthwise.append(layer)
                return self._forward(group, user, dim, block, cat)
            if layer.kind == "conv" and groups(layer) != 1:
                raise Frozen(f"{layer.name} is a grouped conv")
            wanted = 1 if layer.kind == "conv" else rank - 1
            if block == 1 and dim != wanted:
                raise Frozen(f"{layer.name} reads axis {wanted}, the channels are on axis {dim}")
            group.consumers.append((layer, block, cat))
            return None
        if self._is_norm(user) and dim == 1:
            group.norms.append(user)
            return self._forward(group, user, dim, block, cat)
        is_mean = user.target in _MEANS or (user.op == "call_method" and user.target == "mean")
        if self._passes_through(user) or (is_mean and _keeps_channel_axis(user, dim)):
            return self._forward(group, user, dim, block, cat)
        if _is_channel_cat(user, dim) and block == 1:
            group.segments.append((user, node))
            return self._forward(group, user, dim, block, cat=user)
        if user.target in _BINARY or (user.op == "call_method" and user.target in ("add", "mul")):
            for other in user.args[:2]:
                if isinstance(other, fx.Node) and other is not node and G.shape_of(other) == G.shape_of(node):
                    for producer in self._producers_of(other):
                        self._add_producer(group, producer)
            return self._forward(group, user, dim, block, cat)
        if _is_flatten(user) and rank == 4 and dim == 1 and block == 1:
            shape = G.shape_of(node) or (1, 1, 1, 1)
            return self._forward(group, user, dim=1, block=shape[2] * shape[3], cat=cat)
        raise Frozen(f"its channels reach {G.op_key(user, self.gm)} ({user.name})")

    def _passes_through(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.gm.get_submodule(str(node.target)), _UNARY_MODULES)
        if node.op == "call_method":
            return node.target in _UNARY_METHODS
        return node.op == "call_function" and node.target in _UNARY

    def _is_norm(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            module = self.gm.get_submodule(str(node.target))
            return isinstance(module, nn.modules.batchnorm._BatchNorm) and G.call_module_count(self.gm, str(node.target)) == 1
        return False

    def _producers_of(self, node: fx.Node) -> list[Layer]:
        """Trace an operand back through channel-preserving ops to the layers that made it."""
        layer = self.by_node.get(node)
        if layer is not None and layer.kind in ("conv", "linear"):
            if layer.kind == "conv" and groups(layer) != 1:
                return self._producers_of(cast(fx.Node, node.args[0]))  # depthwise: channels pass through
            return [layer]
        if self._is_norm(node) or self._passes_through(node):
            return self._producers_of(cast(fx.Node, node.args[0]))
        if node.target in _BINARY:
            return [p for a in node.args[:2] if isinstance(a, fx.Node) for p in self._producers_of(a)]
        raise Frozen(f"a residual operand comes from {G.op_key(node, self.gm) or node.op} ({node.name})")


def _cat_dim(node: fx.Node) -> int:
    raw: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return raw % len(G.shape_of(node) or (0,)) if isinstance(raw, int) else -1


def _is_channel_cat(node: fx.Node, dim: int) -> bool:
    return node.target in (torch.cat, aten.cat.default) and _cat_dim(node) == dim


def _is_flatten(node: fx.Node) -> bool:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    flat = node.target in _FLATTENS or (node.op == "call_method" and node.target == "flatten")
    return bool(flat and start == 1)


def _keeps_channel_axis(node: fx.Node, dim: int) -> bool:
    """A mean over spatial axes only (after the channel axis ``dim`` = 1)."""
    raw: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = [raw] if isinstance(raw, int) else list(raw or [])
    return dim == 1 and bool(dims) and all(isinstance(d, int) and d >= 2 for d in dims)


def groups(layer: Layer) -> int:
    args: Any = layer.node.args
    return int(args[6]) if layer.kind == "conv" and len(args) > 6 else 1


def _is_depthwise(gm: fx.GraphModule, layer: Layer, channels: int) -> bool:
    weight = G.get_attr_value(gm, str(layer.weight.target)) if layer.weight is not None else None  # type: ignore[union-attr]
    return weight is not None and groups(layer) == channels == weight.shape[0] and weight.shape[1] == 1


def _out_channels(gm: fx.GraphModule, layer: Layer) -> int:
    return int(G.get_attr_value(gm, str(layer.weight.target)).shape[0])  # type: ignore[union-attr]


# --- ranking and shrinking ---------------------------------------------------------------------


def importance(gm: fx.GraphModule, group: Group, norm: str) -> torch.Tensor:
    """Per-channel score: the filters' L1 / L2 norm summed over the group's producers."""
    score = torch.zeros(group.channels, dtype=torch.float64)
    for layer in group.producers:
        weight = G.get_attr_value(gm, str(layer.weight.target)).detach().double()  # type: ignore[union-attr]
        flat = weight.reshape(weight.shape[0], -1)
        score += flat.abs().sum(1) if norm == "l1" else flat.pow(2).sum(1).sqrt()
    return score


def kept_count(channels: int, ratio: float, round_to: int) -> int:
    keep = math.ceil(channels * (1.0 - ratio))
    keep = math.ceil(keep / round_to) * round_to if round_to > 1 else keep
    return max(1, min(channels, keep))


def shrink(gm: fx.GraphModule, keeps: dict[Group, torch.Tensor]) -> None:
    """Slice every member of every group to its kept channels (sorted indices). Consumers are
    sliced once, after all groups are known: behind a concat, their columns are the kept channels
    of every segment at that segment's original offset."""
    owners = {segment: group for group in keeps for segment in group.segments}
    consumers: dict[fx.Node, tuple[Layer, int, fx.Node | None, Group]] = {}
    for group, keep in keeps.items():
        for layer in group.producers:
            slice_args(gm, layer, {1: (0, keep), 2: (0, keep)})
        for layer in group.depthwise:
            slice_args(gm, layer, {1: (0, keep), 2: (0, keep)})
            layer.node.update_arg(6, int(keep.numel()))
        for node in group.norms:
            _shrink_batchnorm(gm, node, keep)
        for layer, block, cat in group.consumers:
            consumers[layer.node] = (layer, block, cat, group)
    for layer, block, cat, group in consumers.values():
        columns = keeps[group] if cat is None else _concat_columns(cat, owners, keeps)
        if block > 1:
            columns = (columns[:, None] * block + torch.arange(block)).flatten()
        slice_args(gm, layer, {1: (1, columns)})


def _concat_columns(
    cat: fx.Node, owners: dict[tuple[fx.Node, fx.Node], Group], keeps: dict[Group, torch.Tensor]
) -> torch.Tensor:
    dim, offset, pieces = _cat_dim(cat), 0, []
    for part in cast(list[fx.Node], cat.args[0]):
        size = (G.shape_of(part) or ())[dim]
        group = owners.get((cat, part))
        kept = keeps[group] if group is not None else torch.arange(size)
        pieces.append(kept + offset)
        offset += size
    return torch.cat(pieces)


def slice_args(gm: fx.GraphModule, layer: Layer, which: dict[int, tuple[int, torch.Tensor]]) -> None:
    args: Any = layer.node.args
    for index, (dim, keep) in which.items():
        arg = args[index] if len(args) > index else None
        if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
            continue
        value = G.get_attr_value(gm, str(arg.target)).detach().index_select(dim, keep)
        with gm.graph.inserting_before(layer.node):
            new = gm.graph.get_attr(G.add_attribute(gm, f"{layer.name}_pruned", value, parameter=True))
        layer.node.update_arg(index, new)


def _shrink_batchnorm(gm: fx.GraphModule, node: fx.Node, keep: torch.Tensor) -> None:
    old = cast(nn.modules.batchnorm._BatchNorm, gm.get_submodule(str(node.target)))
    new = type(old)(keep.numel(), eps=old.eps, momentum=old.momentum, affine=old.affine,
                    track_running_stats=old.track_running_stats)  # fmt: skip
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            value = getattr(old, name)
            if value is not None:
                getattr(new, name).copy_(value.index_select(0, keep))
    new.eval() if not old.training else new.train()
    owner, _, leaf = str(node.target).rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, leaf, new)

