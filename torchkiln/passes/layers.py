"""The layers quantization works on, found in either graph flavour and rewritten to one form.

Module calls (``nn.Conv2d``, ``nn.Linear``), functional calls (``F.conv2d``) and ATen calls from
torch.export all become ATen calls whose weight and bias are ``get_attr`` nodes::

    conv1(x)  →  aten.conv2d.default(x, conv1.weight, conv1.bias, stride, padding, dilation, groups)
    fc(x)     →  aten.linear.default(x, fc.weight, fc.bias)
    a @ b     →  aten.matmul.default(a, b)
    addmm(b, x, W), mm(x, W), x @ W  (W stored, [in, out])  →  aten.linear.default(x, Wᵀ, b)

The last form is GPT-2's ``Conv1D`` and hand-written projections: ``x @ W + b == x @ (Wᵀ)ᵀ + b``,
so the stored ``W`` is replaced by a ``[out, in]`` copy ``Wᵀ`` (kept beside it when another node
still reads ``W``, as a tied embedding does).

:func:`weight_ops` lists every op that multiplies by a stored weight (the layers above plus
embeddings, recurrent and transposed convolutions, opaque module calls) so that a pass can account
for each one: rewritten, kept in float with a reason, or not recognised.

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
_MM_CALLS = {aten.mm.default, torch.mm, aten.addmm.default, torch.addmm}
#: ops that multiply by (or look up in) a weight: with a stored weight operand they are weight layers
_WEIGHT_OPS = {
    *CONV_OPS, aten.linear.default, *_MATMUL_CALLS, *_MM_CALLS, *_RECURRENT_OPS, *_FUNCTIONAL,
    aten.conv3d.default, aten.conv_transpose1d.default, aten.conv_transpose2d.input,
    aten.conv_transpose3d.input, aten.convolution.default, aten._convolution.default,
    aten.embedding.default, aten.embedding_bag.default, aten.einsum.default, torch.einsum,
    aten.baddbmm.default, aten.addbmm.default, aten.addmv.default, aten.mv.default,
    F.embedding, F.embedding_bag, F.bilinear, aten.bilinear.default, F.conv3d, F.conv_transpose1d,
    F.conv_transpose2d, F.conv_transpose3d,
}  # fmt: skip
#: layers that look weights up instead of multiplying by them: int8 buys nothing there
_LOOKUPS = {aten.embedding.default, aten.embedding_bag.default, F.embedding, F.embedding_bag}
#: module types whose weights scale elementwise (not weight layers) or are lookups
_NORMS = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase, nn.PReLU,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)  # fmt: skip


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
    layers, skipped = find_layers_and_skips(gm)
    return layers, [f"{G.module_path(node)}: skipped, {reason}" for node, reason in skipped.items()]


def find_layers_and_skips(gm: fx.GraphModule) -> tuple[list[Layer], dict[fx.Node, str]]:
    """:func:`find_layers`, with the layers it cannot rewrite mapped to the reason."""
    layers, skipped = [], {}
    for node in list(gm.graph.nodes):
        try:
            canonical = _canonicalize(gm, node)
        except _Unsupported as reason:
            skipped[node] = str(reason)
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
    return layers, skipped


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
    if node.target in _MM_CALLS or node.target in _MATMUL_CALLS:
        projection = _from_projection(gm, node)
        if projection is not None:
            return projection
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
        args += tuple(
            values.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))
        )
    with gm.graph.inserting_before(node):
        call = gm.graph.call_function(overload, args)
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    return call


def _from_projection(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """``addmm(b, x, W)`` / ``mm(x, W)`` / ``matmul(x, W)`` with a stored 2-D ``W`` → ``linear(x, Wᵀ, b)``."""
    if set(node.kwargs) - {"beta", "alpha"} or any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
        return None  # a scaled addmm is not a plain projection
    addmm = node.target in (aten.addmm.default, torch.addmm)
    if len(node.args) != (3 if addmm else 2):
        return None
    bias, x, weight = node.args if addmm else (None, *node.args)
    if not _stored(gm, weight, dims=2) or (bias is not None and not _stored(gm, bias, dims=1)):
        return None
    assert isinstance(weight, fx.Node)
    value = G.get_attr_value(gm, str(weight.target))
    owner = str(weight.target).rpartition(".")[0]
    with gm.graph.inserting_before(node):
        name = G.add_attribute(
            gm, f"{owner}.weight_t" if owner else "weight_t", value.detach().t().contiguous(), True
        )
        transposed = gm.graph.get_attr(name)
        call = gm.graph.call_function(aten.linear.default, (x, transposed, bias))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    if not weight.users:  # W itself is read nowhere else: keep only Wᵀ (params are counted once)
        gm.graph.erase_node(weight)
        readers = [
            n
            for n in gm.graph.nodes
            if n.target == weight.target or (n.op == "call_module" and f"{owner}.".startswith(f"{n.target}."))
        ]
        if not readers:  # no other get_attr of it, and no module call that owns it
            module = gm.get_submodule(owner) if owner else gm
            delattr(module, str(weight.target).rpartition(".")[2])
    return call


def _stored(gm: fx.GraphModule, arg: Any, dims: int) -> bool:
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return False
    value = G.get_attr_value(gm, str(arg.target))
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == dims


@dataclasses.dataclass(frozen=True)
class WeightOp:
    """An op that multiplies by (or looks up in) a stored weight."""

    node: fx.Node
    name: str  # module path
    kind: str  # "layer" (a Layer), "lookup", "recurrent", "experts" (grouped matmul), "opaque" (a module call), "other"

    @property
    def description(self) -> str:
        if self.node.op == "call_module":
            return f"{type(self.node.graph.owning_module.get_submodule(str(self.node.target))).__name__} module call"  # type: ignore[union-attr]
        return str(getattr(self.node.target, "__name__", self.node.target))


def weight_ops(gm: fx.GraphModule) -> list[WeightOp]:
    """Every op in the graph that uses a stored weight in a matrix product, a convolution or a
    lookup (elementwise scales such as LayerNorm's are not weight layers), with its kind."""
    ops = []
    stored = _stored_status(gm)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, _NORMS) or not any(True for _ in module.parameters()):
                continue
            kind = "lookup" if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) else "opaque"
            kind = "recurrent" if isinstance(module, nn.RNNBase) else kind
            kind = "layer" if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) else kind
            ops.append(WeightOp(node, G.module_path(node), kind))
        elif (
            node.op == "call_function"
            and (node.target in _WEIGHT_OPS or is_grouped_mm(node))
            and any(stored[a] for a in node.all_input_nodes)
        ):
            kind = "lookup" if node.target in _LOOKUPS else "other"
            kind = "recurrent" if node.target in _RECURRENT_OPS else kind
            kind = "experts" if is_grouped_mm(node) else kind
            ops.append(WeightOp(node, G.module_path(node), kind))
    return ops


def is_grouped_mm(node: fx.Node) -> bool:
    """A mixture-of-experts grouped matmul ([tokens sorted by expert] x [experts, in, out]):
    transformers' ``grouped_mm_fallback``, ``torch._grouped_mm``, ``F.grouped_mm``."""
    name = getattr(node.target, "__name__", "") or str(node.target)
    return node.op == "call_function" and "grouped_mm" in name and "backward" not in name


def _stored_status(gm: fx.GraphModule) -> dict[fx.Node, bool | None]:
    """Per node, in graph order: True / False when computed from stored tensors alone with / without
    one of rank >= 2 among them (a weight, a weight_norm weight, a transposed weight); None when it
    depends on a graph input."""
    status: dict[fx.Node, bool | None] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = G.get_attr_value(gm, str(node.target))
            status[node] = isinstance(value, torch.Tensor) and value.dim() >= 2
        elif node.op in ("call_function", "call_method") and node.all_input_nodes:
            found = [status.get(arg) for arg in node.all_input_nodes]
            status[node] = None if any(f is None for f in found) else any(found)
        else:
            status[node] = None
    return status


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
