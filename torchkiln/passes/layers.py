"""The layers quantization works on, found in either graph flavour and rewritten to one form.

Module calls (``nn.Conv2d``, ``nn.Linear``), functional calls (``F.conv2d``) and ATen calls from
torch.export all become ATen calls whose weight and bias are ``get_attr`` nodes::

    conv1(x)  →  aten.conv2d.default(x, conv1.weight, conv1.bias, stride, padding, dilation, groups)
    fc(x)     →  aten.linear.default(x, fc.weight, fc.bias)
    a @ b     →  aten.matmul.default(a, b)

The rewrite computes the same thing (a module's forward is that call), so later steps replace the
weight argument with its dequantized int8 form and put Q/DQ on the activation arguments without
caring where the layer came from.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import operator
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import fx, nn

from torchkiln.compiler import graph as G

aten = torch.ops.aten
F = nn.functional

CONV_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv1d.padding, aten.conv2d.padding}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default}
_FUNCTIONAL = {F.conv1d: aten.conv1d, F.conv2d: aten.conv2d, F.linear: aten.linear}
_RECURRENT_OPS = {aten.lstm.input, aten.gru.input, aten.rnn_tanh.input, aten.rnn_relu.input}
_MATMUL_CALLS = {torch.matmul, operator.matmul, torch.bmm, aten.matmul.default, aten.bmm.default}


@dataclasses.dataclass(eq=False)  # hashed by identity: a layer is one node of one graph
class Layer:
    node: fx.Node
    name: str
    kind: str  # "conv" | "linear" | "matmul"
    macs: int

    @property
    def key(self) -> str:
        """The node name: unique in the graph and kept by deep copies (``name`` may repeat)."""
        return self.node.name

    @property
    def weight(self) -> fx.Node | None:
        arg = self.node.args[1] if self.kind != "matmul" else None
        return arg if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def ignored(layer: Layer, patterns: Sequence[str]) -> bool:
    """Whether the layer's module path matches one of the ``ignore`` globs (``stem.*``, ``head``)."""
    return any(fnmatch.fnmatchcase(layer.name, pattern) for pattern in patterns)


def find_layers(gm: fx.GraphModule) -> tuple[list[Layer], list[str]]:
    """Canonicalize and list conv1d/2d, linear and matmul layers; notes for layers skipped."""
    layers, notes = [], []
    for node in list(gm.graph.nodes):
        try:
            canonical = _canonicalize(gm, node)
        except _Unsupported as reason:
            notes.append(f"{G.module_path(node)}: skipped, {reason}")
            continue
        if canonical is not None:
            kind = "conv" if canonical.target in CONV_OPS else "linear"
            kind = "matmul" if canonical.target in MATMUL_OPS else kind
            layers.append(Layer(canonical, G.module_path(canonical), kind, _macs(gm, canonical, kind)))
    names = [layer.name for layer in layers]
    for layer in layers:
        if names.count(layer.name) > 1:
            layer.name = f"{layer.name} ({layer.node.name})"
    gm.recompile()
    return layers, notes


class _Unsupported(Exception):
    pass


def _canonicalize(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            if module.padding_mode != "zeros":
                raise _Unsupported(f"padding_mode={module.padding_mode!r} is not supported")
            op = aten.conv1d if isinstance(module, nn.Conv1d) else aten.conv2d
            overload = op.padding if isinstance(module.padding, str) else op.default
            geometry = (module.stride, module.padding, module.dilation, module.groups)
            return _replace(gm, node, overload, str(node.target), module.bias is not None, geometry)
        if isinstance(module, nn.Linear):
            return _replace(gm, node, aten.linear.default, str(node.target), module.bias is not None, ())
        if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Conv3d, nn.RNNBase)):
            raise _Unsupported(f"{type(module).__name__} layers are not handled by this pass")
        return None
    if node.op != "call_function":
        return None
    if node.target in _RECURRENT_OPS:
        raise _Unsupported(f"{node.target} layers are not handled by this pass")
    if node.target in _FUNCTIONAL:
        return _from_functional(gm, node)
    if node.target in _MATMUL_CALLS and len(node.args) == 2 and not node.kwargs:
        if node.target is not aten.matmul.default:
            node.target = aten.matmul.default
        return node
    if node.target in CONV_OPS or node.target is aten.linear.default:
        if not (isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr"):
            raise _Unsupported("its weight is computed in the graph, not a stored tensor")
        return node
    return None


def _replace(
    gm: fx.GraphModule, node: fx.Node, target: Any, owner: str, has_bias: bool, geometry: tuple[Any, ...]
) -> fx.Node:
    with gm.graph.inserting_before(node):
        weight = gm.graph.get_attr(f"{owner}.weight")
        bias = gm.graph.get_attr(f"{owner}.bias") if has_bias else None
        call = gm.graph.call_function(target, (node.args[0], weight, bias, *geometry))
    call.meta = dict(node.meta)
    call.meta.setdefault("nn_module_stack", {owner: (owner, "")})
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    return call


def _from_functional(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    values = dict(zip(names, node.args)) | dict(node.kwargs)
    weight = values.get("weight")
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        raise _Unsupported("its weight is computed in the graph, not a stored tensor")
    op = _FUNCTIONAL[cast(Any, node.target)]
    padding = values.get("padding", 0)
    overload = op.padding if isinstance(padding, str) else op.default
    args: tuple[Any, ...] = (values["input"], weight, values.get("bias"))
    if op is not aten.linear:
        args += tuple(values.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)))
    with gm.graph.inserting_before(node):
        call = gm.graph.call_function(overload, args)
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    return call


def _macs(gm: fx.GraphModule, node: fx.Node, kind: str) -> int:
    """Multiply-accumulates per call at the annotated shapes (0 when unknown)."""
    out = G.shape_of(node)
    weight = node.args[1]
    if out is None:
        return 0
    if kind == "matmul" or not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        first = G.shape_of(node.args[0]) or (1,)
        return math.prod(out) * int(first[-1])
    return math.prod(out) * math.prod(G.get_attr_value(gm, str(weight.target)).shape[1:])
