"""What a quantize run did to every weight layer of the graph: the report's stats and notes.

Every op that multiplies by (or looks up in) a stored weight (:func:`~torchkiln.passes.layers.weight_ops`)
is exactly one of

* ``quantized``;
* ``float``: a layer kept in float, with the reason (``ignore``, ``min_macs``, a kind the mode does
  not quantize, an embedding lookup, a recurrent layer, a weight computed in the graph);
* ``unrecognised``: an op this pass cannot see into (an opaque module call, ``einsum`` with a
  weight), named by module path so that no layer is missed silently.

Matrix products between two activations (attention scores) hold no weight: they are counted
apart (``matmuls``) when int8 quantizes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import fx

from torchkiln.passes.layers import Layer, WeightOp

LOOKUP = "an embedding lookup (a gather: int8 would only save memory, not compute)"
EXPERTS = (
    "a mixture-of-experts grouped matmul (all experts' weights in one [experts, in, out] tensor): "
    "mode={mode} does not quantize experts (mode=dynamic and mode=weight_only do)"
)


def account(
    census: Sequence[WeightOp],
    layers: Sequence[Layer],
    chosen: Sequence[Layer],
    float_reasons: Mapping[str, str],
    skipped: Mapping[fx.Node, str],
    mode: str,
    experts: Mapping[fx.Node, str | None] | None = None,
) -> tuple[dict[str, int | float], list[str]]:
    """``census`` and ``layers`` are taken from the graph before the rewrite; ``float_reasons``
    maps a layer's key to why it stayed in float; ``experts`` each grouped matmul to None
    (quantized) or why it stayed in float."""
    by_node = {layer.node: layer for layer in layers}
    done = {layer.key for layer in chosen}
    stats: dict[str, int | float] = {"quantized": 0, "float": 0, "unrecognised": 0}
    notes = []
    experts = experts or {}
    for op in census:
        layer = by_node.get(op.node)
        if (layer is not None and layer.key in done) or (op.node in experts and experts[op.node] is None):
            stats["quantized"] += 1
            continue
        if op.node in experts:
            stats["float"] += 1
            notes.append(f"{op.name}: left in float, {experts[op.node]}")
            continue
        status, why = _why_not(op, layer, float_reasons, skipped)
        stats[status] += 1
        notes.append(f"{layer.name if layer else op.name}: {'left in float' if status == 'float' else 'not recognised'}, {why}")
    in_census = {op.node for op in census}
    activations = [layer for layer in layers if layer.node not in in_census]
    quantized = sum(1 for layer in activations if layer.key in done)
    if quantized:
        stats["matmuls"] = quantized
    if len(activations) > quantized:
        notes.append(
            f"{len(activations) - quantized} matmul(s) between two activations (no stored weight) stay in float"
            + (f" in mode={mode}" if mode != "int8" else "")
        )
    return stats, notes


def _why_not(
    op: WeightOp, layer: Layer | None, float_reasons: Mapping[str, str], skipped: Mapping[fx.Node, str]
) -> tuple[str, str]:
    if layer is not None:
        return "float", float_reasons.get(layer.key, "not selected")
    if op.node in skipped:
        return "float", skipped[op.node]
    if op.kind == "lookup":
        return "float", LOOKUP
    if op.kind == "opaque":
        return "unrecognised", (
            f"a {op.description}: its weights are invisible to passes (capture with frontend='export')"
        )
    return "unrecognised", f"{op.description} with a stored weight is not a layer kind this pass rewrites"
