"""``fold_batchnorm``: fold an eval-mode BatchNorm into the Conv / ConvTranspose / Linear before it.

With ``y = conv(x; W, b)`` and ``BN(y) = gamma * (y - mean) / sqrt(var + eps) + beta``, let
``s = gamma / sqrt(var + eps)`` (one value per output channel). Then ``BN(conv(x; W, b)) =
conv(x; W', b')`` with::

    W' = W * s        (along the output-channel axis: dim 0 for Conv/Linear, dim 1 within
                       each group for ConvTranspose, whose weight is (in, out/groups, *k))
    b' = (b - mean) * s + beta      (b = 0 when the layer has no bias)

computed in float64 and cast back. A BN is folded only when it is in eval mode with running
statistics, its input is the layer's output and nothing else reads that output, and (for Linear)
the output is 2-D so BN's channel axis is the feature axis. Every BN left alone gets a note.

Module flavour: the layer's weights are updated in place (when the layer is called once) and the
BN call disappears. ATen flavour: new weight/bias attributes replace the layer's ``get_attr``
inputs, so weights shared with other nodes are never touched.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx, nn

from torchkiln.compiler import graph as G
from torchkiln.compiler.passes import Pass, PassConfig, PassResult, register_pass
from torchkiln.compiler.program import Program

aten = torch.ops.aten

_LAYER_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_CONV_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
             aten.conv2d.padding, aten.conv3d.padding}  # fmt: skip
_TRANSPOSED_OPS = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
_LAYER_OPS = _CONV_OPS | _TRANSPOSED_OPS | {aten.convolution.default, aten.linear.default}
# BN op -> index of eps in its arguments
_BN_OPS = {aten.batch_norm.default: 7, aten._native_batch_norm_legit_no_training.default: 6}


@dataclasses.dataclass(frozen=True)
class FoldBatchNormConfig(PassConfig):
    pass


@dataclasses.dataclass
class _Stats:
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor
    eps: float


@register_pass
class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm into the preceding Conv1d/2d/3d, ConvTranspose or Linear."""

    name = "fold_batchnorm"
    Config = FoldBatchNormConfig

    def run(self, program: Program) -> PassResult:
        gm = program.graph_module
        folded, notes = 0, []
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.modules.batchnorm._BatchNorm):
                reason = _fold_module(gm, node)
            elif node.op == "call_function" and node.target in _BN_OPS:
                reason = _fold_aten(gm, node)
            else:
                continue
            if reason:
                notes.append(f"{_label(node)}: not folded, {reason}")
            else:
                folded += 1
        if folded:
            gm.graph.eliminate_dead_code()
            G.drop_unused_attributes(gm)
        return PassResult(modified=folded > 0, stats={"folded": folded, "not_folded": len(notes)}, notes=notes)


def _label(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else node.name


def folded_weights(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: _Stats, transposed: bool, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """W' and b' as in the module docstring."""
    w = weight.detach().double()
    out_channels = w.shape[1] * groups if transposed else w.shape[0]
    scale = torch.rsqrt(bn.var.double() + bn.eps)
    if bn.gamma is not None:
        scale = scale * bn.gamma.detach().double()
    if transposed:
        kernel = w.shape[2:]
        grouped = w.reshape(groups, w.shape[0] // groups, w.shape[1], *kernel)
        w = (grouped * scale.reshape(groups, 1, w.shape[1], *[1] * len(kernel))).reshape(weight.shape)
    else:
        w = w * scale.reshape(-1, *[1] * (w.dim() - 1))
    b = bias.detach().double() if bias is not None else torch.zeros(out_channels, dtype=torch.float64)
    b = (b - bn.mean.double()) * scale
    if bn.beta is not None:
        b = b + bn.beta.detach().double()
    return w.to(weight.dtype), b.to(weight.dtype)


def _common_checks(bn_node: fx.Node, layer: fx.Node, is_linear: bool, channels: int, out_channels: int) -> str | None:
    if len(layer.users) != 1:
        return f"the output of {_label(layer)} has other users"
    if is_linear and len(G.shape_of(layer) or ()) != 2:
        return "BN normalizes dim 1 of a Linear output that is not 2-D, which is not its feature axis"
    if channels != out_channels:
        return f"BN has {channels} channels but {_label(layer)} produces {out_channels}"
    return None


def _fold_module(gm: fx.GraphModule, bn_node: fx.Node) -> str | None:
    bn = gm.get_submodule(str(bn_node.target))
    if bn.training:
        return "BN is in training mode"
    if bn.running_mean is None or bn.running_var is None:
        return "BN has no running statistics (track_running_stats=False)"
    layer = bn_node.args[0]
    if not (isinstance(layer, fx.Node) and layer.op == "call_module"):
        return "its input is not a Conv/ConvTranspose/Linear module call"
    module = gm.get_submodule(str(layer.target))
    if not isinstance(module, _LAYER_MODULES):
        return f"its input {layer.target} is a {type(module).__name__}, not a Conv/ConvTranspose/Linear"
    if G.call_module_count(gm, str(layer.target)) > 1:
        return f"{layer.target} is called at more than one place"
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    groups = getattr(module, "groups", 1)
    out_channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    reason = _common_checks(bn_node, layer, isinstance(module, nn.Linear), bn.num_features, out_channels)
    if reason:
        return reason
    stats = _Stats(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    weight, bias = folded_weights(module.weight, module.bias, stats, transposed, groups)
    module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    module.bias = nn.Parameter(bias, requires_grad=module.weight.requires_grad)
    bn_node.replace_all_uses_with(layer)
    gm.graph.erase_node(bn_node)
    return None


def _tensor_arg(gm: fx.GraphModule, node: fx.Node, index: int) -> torch.Tensor | None | str:
    """A get_attr argument's tensor, None for an absent/None argument, or a reason string."""
    value = node.args[index] if len(node.args) > index else None
    if value is None:
        return None
    if isinstance(value, fx.Node) and value.op == "get_attr":
        return G.get_attr_value(gm, str(value.target))
    return f"argument {index} of {node.name} is computed, not a stored tensor"


def _fold_aten(gm: fx.GraphModule, bn_node: fx.Node) -> str | None:
    if bn_node.target is aten.batch_norm.default and bn_node.args[5]:
        return "BN is in training mode"
    output = bn_node
    if bn_node.target is aten._native_batch_norm_legit_no_training.default:
        getters = list(bn_node.users)
        if len(getters) != 1 or getters[0].args[1] != 0:
            return "its mean/var outputs are used"
        output = getters[0]
    layer = bn_node.args[0]
    if not (isinstance(layer, fx.Node) and layer.op == "call_function" and layer.target in _LAYER_OPS):
        return "its input is not a conv/conv_transpose/linear op"
    args = [_tensor_arg(gm, bn_node, i) for i in range(1, 5)] + [_tensor_arg(gm, layer, 1), _tensor_arg(gm, layer, 2)]
    for arg in args:
        if isinstance(arg, str):
            return arg
    gamma, beta, mean, var, weight, bias = args
    if mean is None or var is None or weight is None:
        return "BN has no running statistics"
    transposed, groups = _layer_geometry(layer)
    out_channels = weight.shape[1] * groups if transposed else weight.shape[0]
    reason = _common_checks(bn_node, layer, layer.target is aten.linear.default, mean.numel(), out_channels)
    if reason:
        return reason
    stats = _Stats(gamma, beta, mean, var, float(bn_node.args[_BN_OPS[bn_node.target]]))  # type: ignore[index]
    new_weight, new_bias = folded_weights(weight, bias, stats, transposed, groups)
    with gm.graph.inserting_before(layer):
        w_node = gm.graph.get_attr(G.add_attribute(gm, f"{layer.name}_folded_weight", new_weight, parameter=True))
        b_node = gm.graph.get_attr(G.add_attribute(gm, f"{layer.name}_folded_bias", new_bias, parameter=True))
    layer.update_arg(1, w_node)
    if len(layer.args) > 2:
        layer.update_arg(2, b_node)
    else:
        layer.args = (*layer.args, b_node)
    output.replace_all_uses_with(layer)
    return None


def _layer_geometry(layer: fx.Node) -> tuple[bool, int]:
    """(transposed, groups) of an ATen conv/linear call."""
    if layer.target in _TRANSPOSED_OPS:
        return True, int(layer.args[6]) if len(layer.args) > 6 else 1
    if layer.target is aten.convolution.default:
        return bool(layer.args[6]), int(layer.args[8])
    return False, 1
