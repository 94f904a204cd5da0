"""Static int8: where Q/DQ pairs go, calibrating their ranges, and inserting them.

Placement follows what ONNX Runtime's QDQ optimizer turns into integer kernels (see
``docs/design/quantization-placement.md``) and TensorRT's explicit-quantization rules:

* every activation *input* of a quantized conv / linear / matmul gets a Q/DQ pair;
* the layer's *output* gets one after the activation it fuses with (ReLU, ReLU6), never between
  the layer and that activation — QLinearConv / QGemm / QLinearMatMul need it there;
* a residual add whose two inputs are quantized gets one on its output (after a ReLU): QLinearAdd
  — unless it feeds only normalizations (LayerNorm in post-LN transformers): no integer kernel
  gains there, and the norm amplifies the rounding wherever the sum is small (padded positions:
  DeBERTa's went to cosine 0);
* a tensor produced by a range-preserving op (max-pool, reshape, flatten, transpose) from a
  quantized tensor reuses that tensor's scale, so the runtime can drop the pair around the op.

Weights become int8 buffers (per output channel, symmetric, zero point 0) behind
``dequantize_per_channel``, so the exported file holds int8 initializers. The quantized graph is::

    x_q = quantize_per_tensor(x, s_x, z_x, 0, 255, uint8);  x_dq = dequantize_per_tensor(x_q, ...)
    w_dq = dequantize_per_channel(w_int8, s_w, 0, axis=0, -128, 127, int8)
    y = relu(conv2d(x_dq, w_dq, b));  y_q = quantize_per_tensor(y, s_y, z_y, ...);  ...
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from torchkiln.compiler import graph as G
from torchkiln.compiler.quant_ops import DEQUANTIZE, DEQUANTIZE_CHANNEL, QUANTIZE, quantize_weight_per_channel
from torchkiln.passes.layers import Layer
from torchkiln.passes.quantize.observers import Histogram, QParams, choose_range, finite_values

aten = torch.ops.aten
F = nn.functional

_FUSED_ACTIVATIONS = {aten.relu.default, aten.relu_.default, F.relu, torch.relu, F.relu6, aten.hardtanh.default}
_FUSED_MODULES = (nn.ReLU, nn.ReLU6)
_ADDS = {operator.add, torch.add, aten.add.Tensor}
_PASSTHROUGH = {
    F.max_pool2d, F.max_pool1d, aten.max_pool2d.default, aten.max_pool1d.default, torch.flatten,
    aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten.permute.default,
    aten.transpose.int, aten.t.default, torch.transpose, torch.reshape, torch.permute,
}  # fmt: skip
_PASSTHROUGH_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous"}
_PASSTHROUGH_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Identity)
_NORM_FUNCTIONS = {
    F.layer_norm, F.group_norm, aten.layer_norm.default, aten.native_layer_norm.default, aten.group_norm.default,
    *((F.rms_norm, aten.rms_norm.default) if hasattr(aten, "rms_norm") else ()),
}  # fmt: skip
_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def _is(gm: fx.GraphModule, node: fx.Node, functions: set[Any], modules: tuple[type, ...], methods: set[str]) -> bool:
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), modules)
    return node.op == "call_method" and node.target in methods


def output_end(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """``node``, or the activation after it that the runtime fuses into the integer kernel."""
    users = list(node.users)
    if len(users) == 1 and users[0].args and users[0].args[0] is node:
        if _is(gm, users[0], _FUSED_ACTIVATIONS, _FUSED_MODULES, set()):
            if users[0].target is not aten.hardtanh.default or users[0].args[1:2] in ((0,), (0.0,)):
                return users[0]
    return node


def _activation_inputs(layer: Layer) -> list[fx.Node]:
    count = 2 if layer.kind == "matmul" else 1
    return [a for a in layer.node.args[:count] if isinstance(a, fx.Node) and G.dtype_of(a) == torch.float32]


def plan(gm: fx.GraphModule, layers: Sequence[Layer]) -> dict[fx.Node, fx.Node]:
    """Tensors to quantize when ``layers`` are quantized: node → node whose scale it uses."""
    wanted: set[fx.Node] = set()
    for layer in layers:
        wanted.update(_activation_inputs(layer))
        wanted.add(output_end(gm, layer.node))
    for node in gm.graph.nodes:  # topological order: chains of residual adds see their inputs
        if node.op != "output" and _is(gm, node, _ADDS, (), {"add", "__add__"}):
            tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            end = output_end(gm, node)
            feeds_only_norms = bool(end.users) and all(_is(gm, u, _NORM_FUNCTIONS, _NORM_MODULES, set()) for u in end.users)
            if len(tensors) == 2 and all(t in wanted for t in tensors) and not feeds_only_norms:
                wanted.add(end)
    sources: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node not in wanted:
            continue
        first = node.args[0] if node.args else None
        passthrough = _is(gm, node, _PASSTHROUGH, _PASSTHROUGH_MODULES, _PASSTHROUGH_METHODS)
        sources[node] = sources[first] if passthrough and isinstance(first, fx.Node) and first in sources else node
    return sources


class _Recorder(fx.Interpreter):
    """Runs the float graph and feeds the observed tensors to their histograms."""

    def __init__(self, gm: fx.GraphModule, observers: dict[str, Histogram]):
        super().__init__(gm)
        self.observers = observers

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        histogram = self.observers.get(n.name)
        if histogram is not None and isinstance(value, torch.Tensor):
            histogram.update(value)
        return value


def calibrate(
    gm: fx.GraphModule,
    tensors: Iterable[fx.Node],
    batches: Iterable[tuple[torch.Tensor, ...]],
    rank: int = 0,
    world: int = 1,
) -> dict[str, Histogram]:
    """One pass over ``batches``; a histogram per tensor in ``tensors``. With ``world`` > 1 (a
    torchrun group) rank r runs batches r, r + world, …, and the histograms come out equal to one
    process's on all the batches (:func:`_calibrate_shards`)."""
    observers = {node.name: Histogram() for node in tensors}
    if world > 1:
        _calibrate_shards(gm, observers, batches, rank, world)
        return observers
    recorder = _Recorder(gm, observers)
    with torch.no_grad():
        for batch in batches:
            recorder.run(*batch)
    return observers


class _Collector(fx.Interpreter):
    """Runs the float graph and keeps the finite values of the observed tensors of one batch."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def collect(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        self.values = {}
        with torch.no_grad():
            self.run(*batch)
        return self.values

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.names and isinstance(value, torch.Tensor):
            self.values[n.name] = finite_values(value)
        return value


def _calibrate_shards(
    gm: fx.GraphModule, observers: dict[str, Histogram], batches: Iterable[tuple[torch.Tensor, ...]],
    rank: int, world: int,
) -> None:  # fmt: skip
    """Batches in steps of ``world``; in each, rank j's batch is global batch ``step * world + j``.
    Every rank applies every batch's range, in global order (one all-gather of (min, max) per
    step), so all ranks' histograms have the same range at every moment — the single-process
    sequence — and each bins its own batches; summing the counts (exact in float64) then gives the
    single-process histogram."""
    import torch.distributed as dist

    names = sorted(observers)
    collector = _Collector(gm, set(names))
    step: list[dict[str, torch.Tensor] | None] = []
    for index, batch in enumerate(batches):
        step.append(collector.collect(batch) if index % world == rank else None)
        if len(step) == world:
            _apply_step(observers, names, step[rank], rank, world)
            step = []
    if step:  # the last, partial step: ranks past its end have no batch
        _apply_step(observers, names, step[rank] if rank < len(step) else None, rank, world)
    totals = torch.stack([torch.cat([observers[n].counts, torch.tensor([observers[n].zeros], dtype=torch.float64)])
                          for n in names])  # fmt: skip
    dist.all_reduce(totals)
    for name, row in zip(names, totals):
        observers[name].counts, observers[name].zeros = row[:-1].clone(), float(row[-1])


def _apply_step(
    observers: dict[str, Histogram], names: list[str], mine: dict[str, torch.Tensor] | None, rank: int, world: int
) -> None:
    import torch.distributed as dist

    ranges = torch.full((len(names), 2), math.inf, dtype=torch.float64)
    ranges[:, 1] = -math.inf
    for row, name in enumerate(names):
        values = (mine or {}).get(name)
        if values is not None and values.numel():
            ranges[row, 0], ranges[row, 1] = float(values.min()), float(values.max())
    gathered = [torch.empty_like(ranges) for _ in range(world)]
    dist.all_gather(gathered, ranges)
    for j, rows in enumerate(gathered):
        for row, name in enumerate(names):
            observers[name].extend(float(rows[row, 0]), float(rows[row, 1]))
            values = (mine or {}).get(name) if j == rank else None
            if values is not None and values.numel():
                observers[name].add(values)


def qparams_for(
    observers: dict[str, Histogram], method: str, percentile: float, signed: bool
) -> dict[str, QParams]:
    return {
        name: QParams.from_range(*choose_range(h, method, percentile, signed), signed=signed)
        for name, h in observers.items()
    }


def apply(
    gm: fx.GraphModule, layers: Sequence[Layer], qparams: dict[str, QParams], weight_levels: int
) -> None:
    """Insert the Q/DQ pairs of :func:`plan` and int8 weights for ``layers``."""
    for node, source in plan(gm, layers).items():
        _insert_qdq(gm, node, qparams[source.name])
    cache: dict[str, fx.Node] = {}
    for layer in layers:
        weight = layer.weight
        if weight is not None:
            if str(weight.target) not in cache:
                cache[str(weight.target)] = _int8_weight(gm, weight, layer.node, weight_levels)
            layer.node.update_arg(1, cache[str(weight.target)])
    gm.graph.eliminate_dead_code()
    G.drop_unused_attributes(gm)
    gm.recompile()


def _insert_qdq(gm: fx.GraphModule, node: fx.Node, q: QParams) -> None:
    anchor = node
    if node.op == "placeholder":
        anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    args = (q.scale, q.zero_point, q.qmin, q.qmax, q.dtype)
    with gm.graph.inserting_after(anchor):
        quantized = gm.graph.call_function(QUANTIZE, (node, *args))
    with gm.graph.inserting_after(quantized):
        dequantized = gm.graph.call_function(DEQUANTIZE, (quantized, *args))
    node.replace_all_uses_with(dequantized, delete_user_cb=lambda user: user is not quantized)


def _int8_weight(gm: fx.GraphModule, weight: fx.Node, before: fx.Node, levels: int) -> fx.Node:
    value = G.get_attr_value(gm, str(weight.target))
    q, scale = quantize_weight_per_channel(value, levels)
    base = str(weight.target)
    with gm.graph.inserting_before(before):
        q_node = gm.graph.get_attr(G.add_attribute(gm, f"{base}_int8", q, parameter=True))
        s_node = gm.graph.get_attr(G.add_attribute(gm, f"{base}_scale", scale, parameter=False))
        zeros = torch.zeros(scale.numel(), dtype=torch.int64)
        z_node = gm.graph.get_attr(G.add_attribute(gm, f"{base}_zero_point", zeros, parameter=False))
        return gm.graph.call_function(DEQUANTIZE_CHANNEL, (q_node, s_node, z_node, 0, -128, 127, torch.int8))
