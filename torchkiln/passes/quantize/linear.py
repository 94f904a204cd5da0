"""Dynamic int8 and weight-only quantization of Linear layers.

Both replace ``aten.linear(x, W, b)`` with one IR op (see :mod:`torchkiln.compiler.quant_ops`)
whose weight is stored quantized:

* dynamic: ``dynamic_linear(x, W_int8, s_W, b)`` — per-output-channel symmetric int8 weights
  (7-bit with ``reduce_range``, which keeps AVX2's 16-bit accumulation of u8×s8 pairs from
  saturating), activations quantized per call. ONNX Runtime runs it as DynamicQuantizeMatMul.
* weight-only: ``weight_only_linear(x, packed, scales, b, bits, block_size)`` — int4 or int8
  weights in blocks along the input dim, activations stay float. ONNX Runtime runs MatMulNBits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import fx

from torchkiln.compiler import graph as G
from torchkiln.compiler.quant_ops import pack_blocks, quantize_weight_per_channel
from torchkiln.passes.layers import Layer


def _bias(gm: fx.GraphModule, layer: Layer) -> torch.Tensor:
    bias = layer.node.args[2] if len(layer.node.args) > 2 else None
    if isinstance(bias, fx.Node):
        return G.get_attr_value(gm, str(bias.target)).detach().float()
    return torch.zeros(0)


def _replace(gm: fx.GraphModule, layer: Layer, op: object, tensors: Sequence[torch.Tensor], extra: tuple) -> None:
    node = layer.node
    with gm.graph.inserting_before(node):
        attrs = [
            gm.graph.get_attr(G.add_attribute(gm, f"{layer.name}_{suffix}", t, parameter=suffix == "weight"))
            for suffix, t in zip(("weight", "scale", "zero_point", "bias") if len(tensors) == 4
                                 else ("weight", "scale", "bias"), tensors)  # fmt: skip
        ]
        call = gm.graph.call_function(op, (node.args[0], *attrs, *extra))  # type: ignore[arg-type]
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)


def quantize_dynamic(gm: fx.GraphModule, layers: Sequence[Layer], reduce_range: bool) -> None:
    for layer in layers:
        weight = G.get_attr_value(gm, str(layer.weight.target))  # type: ignore[union-attr]
        q, scale = quantize_weight_per_channel(weight, 63 if reduce_range else 127)
        _replace(gm, layer, torch.ops.torchkiln.dynamic_linear.default, (q, scale, _bias(gm, layer)), ())
    gm.graph.eliminate_dead_code()
    G.drop_unused_attributes(gm)
    gm.recompile()


#: a layer's weight [out, in] → (packed, scales, zero points or None), or None for round to nearest
Chooser = Callable[[Layer, torch.Tensor], "tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None"]


def quantize_weights(
    gm: fx.GraphModule, layers: Iterable[Layer], bits: int, block_size: int, symmetric: bool = True,
    choose: Chooser | None = None,
) -> None:  # fmt: skip
    """Each layer's weight in ``bits``-bit blocks: as ``choose`` picks the codes (GPTQ), else rounded
    to nearest; asymmetric grids store a zero point per block (``weight_only_linear_zp``)."""
    for layer in layers:
        weight = G.get_attr_value(gm, str(layer.weight.target))  # type: ignore[union-attr]
        chosen = choose(layer, weight) if choose is not None else None
        packed, scales, zeros = chosen if chosen is not None else pack_blocks(weight, bits, block_size, symmetric)
        if zeros is None:
            _replace(gm, layer, torch.ops.torchkiln.weight_only_linear.default, (packed, scales, _bias(gm, layer)),
                     (bits, block_size))  # fmt: skip
        else:
            _replace(gm, layer, torch.ops.torchkiln.weight_only_linear_zp.default,
                     (packed, scales, zeros, _bias(gm, layer)), (bits, block_size))  # fmt: skip
    gm.graph.eliminate_dead_code()
    G.drop_unused_attributes(gm)
    gm.recompile()


_TRANSPOSES = {torch.ops.aten.transpose.int, torch.transpose}


def expert_weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The stored [experts, in, out] weight of a grouped matmul — a stored tensor, or the transpose
    of a stored [experts, out, in] one (transformers' layout, before cleanup folds it) — or None
    when it is computed otherwise."""
    weight = node.args[1] if len(node.args) > 1 else None
    swapped = False
    if isinstance(weight, fx.Node) and weight.op == "call_function" and weight.target in _TRANSPOSES:
        dims = weight.args[1:3]
        if not all(isinstance(d, int) for d in dims) or sorted(int(d) % 3 for d in dims) != [1, 2]:  # type: ignore[arg-type]
            return None
        weight, swapped = weight.args[0], True
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    value = G.get_attr_value(gm, str(weight.target))
    if not isinstance(value, torch.Tensor) or value.dim() != 3:
        return None
    return value.transpose(1, 2) if swapped else value


def quantize_expert_weights(
    gm: fx.GraphModule, nodes: Sequence[fx.Node], bits: int | None, block_size: int, reduce_range: bool = False
) -> None:
    """``grouped_mm(x, W[E, in, out], offsets)`` → ``grouped_weight_only_mm(x, packed, scales,
    offsets, bits, block_size)`` (every expert's [out, in] weight in ``bits``-bit blocks), or with
    ``bits=None`` → ``grouped_dynamic_mm(x, W_int8[E, out, in], scales[E, out], offsets)``."""
    for node in nodes:
        weight = expert_weight(gm, node)
        assert weight is not None
        extra: tuple[int, ...]
        if bits is None:
            pairs = [quantize_weight_per_channel(w.t(), 63 if reduce_range else 127) for w in weight]
            op, extra = torch.ops.torchkiln.grouped_dynamic_mm.default, ()
        else:
            pairs = [pack_blocks(w.t(), bits, block_size)[:2] for w in weight]
            op, extra = torch.ops.torchkiln.grouped_weight_only_mm.default, (bits, block_size)
        stored, scales = torch.stack([p for p, _ in pairs]), torch.stack([s for _, s in pairs])
        name = G.module_path(node) or node.name
        with gm.graph.inserting_before(node):
            attrs = [
                gm.graph.get_attr(G.add_attribute(gm, f"{name}_{suffix}", t, parameter=suffix == "weight"))
                for suffix, t in (("weight", stored), ("scale", scales))
            ]
            call = gm.graph.call_function(op, (node.args[0], *attrs, node.args[2], *extra))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    G.drop_unused_attributes(gm)
    gm.recompile()
