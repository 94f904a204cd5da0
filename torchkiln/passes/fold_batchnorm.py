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
from typing import Any, cast

import torch
from torch import fx, nn

from torchkiln.compiler import graph as G
from torchkiln.compiler.passes import Pass, PassConfig, PassResult, register_pass
from torchkiln.compiler.program import Program

aten = torch.ops.aten
_BatchNorm = nn.modules.batchnorm._BatchNorm

_LAYER_MODULES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)
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
            if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), _BatchNorm):
                fold = _fold_module
            elif node.op == "call_function" and node.target in _BN_OPS:
                fold = _fold_aten
            else:
                continue
            try:
                fold(gm, node)
                folded += 1
            except _Skip as reason:
                notes.append(f"{G.module_path(node)}: not folded, {reason}")
        if folded:
            gm.graph.eliminate_dead_code()
            G.drop_unused_attributes(gm)
        return PassResult(
            modified=folded > 0, stats={"folded": folded, "not_folded": len(notes)}, notes=notes
        )


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


class _Skip(Exception):
    """Raised with the reason a BN is left alone; the pass turns it into a note."""


def _common_checks(layer: fx.Node, is_linear: bool, channels: int, out_channels: int) -> None:
    if len(layer.users) != 1:
        raise _Skip(f"the output of {G.module_path(layer)} has other users")
    if is_linear and len(G.shape_of(layer) or ()) != 2:
        raise _Skip("BN normalizes dim 1 of a Linear output that is not 2-D, which is not its feature axis")
    if channels != out_channels:
        raise _Skip(f"BN has {channels} channels but {G.module_path(layer)} produces {out_channels}")


def _fold_module(gm: fx.GraphModule, bn_node: fx.Node) -> None:
    bn = cast(_BatchNorm, gm.get_submodule(str(bn_node.target)))
    if bn.training:
        raise _Skip("BN is in training mode")
    if bn.running_mean is None or bn.running_var is None:
        raise _Skip("BN has no running statistics (track_running_stats=False)")
    layer = bn_node.args[0]
    if not (isinstance(layer, fx.Node) and layer.op == "call_module"):
        raise _Skip("its input is not a Conv/ConvTranspose/Linear module call")
    module: Any = gm.get_submodule(str(layer.target))
    if not isinstance(module, _LAYER_MODULES):
        raise _Skip(f"its input {layer.target} is a {type(module).__name__}, not a Conv/ConvTranspose/Linear")
    if G.call_module_count(gm, str(layer.target)) > 1:
        raise _Skip(f"{layer.target} is called at more than one place")
    is_linear = isinstance(module, nn.Linear)
    out_channels: int = module.out_features if is_linear else module.out_channels  # type: ignore[assignment]
    _common_checks(layer, is_linear, int(bn.num_features), out_channels)
    stats = _Stats(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    weight, bias = folded_weights(module.weight, module.bias, stats, transposed, getattr(module, "groups", 1))
    module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    module.bias = nn.Parameter(bias, requires_grad=module.weight.requires_grad)
    bn_node.replace_all_uses_with(layer)
    gm.graph.erase_node(bn_node)


def _stored(gm: fx.GraphModule, node: fx.Node, index: int) -> torch.Tensor | None:
    """A get_attr argument's tensor, or None for an absent/None argument."""
    value = node.args[index] if len(node.args) > index else None
    if value is None:
        return None
    if isinstance(value, fx.Node) and value.op == "get_attr":
        return cast(torch.Tensor, G.get_attr_value(gm, str(value.target)))
    raise _Skip(f"argument {index} of {node.name} is computed, not a stored tensor")


def _fold_aten(gm: fx.GraphModule, bn_node: fx.Node) -> None:
    if bn_node.target is aten.batch_norm.default and bn_node.args[5]:
        raise _Skip("BN is in training mode")
    output = bn_node
    if bn_node.target is aten._native_batch_norm_legit_no_training.default:
        getters = list(bn_node.users)
        if len(getters) != 1 or getters[0].args[1] != 0:
            raise _Skip("its mean/var outputs are used")
        output = getters[0]
    layer = bn_node.args[0]
    if not (isinstance(layer, fx.Node) and layer.op == "call_function" and layer.target in _LAYER_OPS):
        raise _Skip("its input is not a conv/conv_transpose/linear op")
    gamma, beta, mean, var = (_stored(gm, bn_node, i) for i in range(1, 5))
    weight, bias = _stored(gm, layer, 1), _stored(gm, layer, 2)
    if mean is None or var is None or weight is None:
        raise _Skip("BN has no running statistics")
    transposed, groups = _layer_geometry(layer)
    out_channels = weight.shape[1] * groups if transposed else weight.shape[0]
    _common_checks(layer, layer.target is aten.linear.default, mean.numel(), out_channels)
    eps = float(cast(float, bn_node.args[_BN_OPS[cast(Any, bn_node.target)]]))
    new_weight, new_bias = folded_weights(
        weight, bias, _Stats(gamma, beta, mean, var, eps), transposed, groups
    )
    with gm.graph.inserting_before(layer):
        w_node = gm.graph.get_attr(
            G.add_attribute(gm, f"{layer.name}_folded_weight", new_weight, parameter=True)
        )
        b_node = gm.graph.get_attr(G.add_attribute(gm, f"{layer.name}_folded_bias", new_bias, parameter=True))
    layer.update_arg(1, w_node)
    if len(layer.args) > 2:
        layer.update_arg(2, b_node)
    else:
        layer.args = (*layer.args, b_node)
    output.replace_all_uses_with(layer)


def _layer_geometry(layer: fx.Node) -> tuple[bool, int]:
    """(transposed, groups) of an ATen conv/linear call."""
    args = cast(tuple[Any, ...], layer.args)
    if layer.target in _TRANSPOSED_OPS:
        return True, int(args[6]) if len(args) > 6 else 1
    if layer.target is aten.convolution.default:
        return bool(args[6]), int(args[8])
    return False, 1
