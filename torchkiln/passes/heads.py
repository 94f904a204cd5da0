"""Attention heads as units of structured pruning.

Recognised (module-call graphs, i.e. ``torch.fx`` captures) — the attention written out as::

    q = linear_q(x).reshape(b, s, H, D).transpose(1, 2)        # likewise k, v
    p = softmax(q @ k.transpose(-2, -1) * scale)                # any mul/div/dropout around it
    out = proj((p @ v).transpose(1, 2).reshape(b, s, -1))

A head ``h`` owns rows ``h·D … h·D+D-1`` of the q, k and v weights and biases and the same columns
of ``proj``. Pruning a head removes all of those and rewrites the ``H`` in the three reshapes (the
output reshape must use ``-1``). Heads are ranked by the L1 norm of their q, k and v rows.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch
from torch import fx

from torchkiln.compiler import graph as G
from torchkiln.passes.channels import slice_args
from torchkiln.passes.layers import Layer

_SCALES = {operator.mul, operator.truediv, torch.mul, torch.div, torch.nn.functional.dropout}
_SOFTMAX = {torch.softmax, torch.nn.functional.softmax}


@dataclasses.dataclass(eq=False)
class Heads:
    q: Layer
    k: Layer
    v: Layer
    proj: Layer
    reshapes: tuple[fx.Node, fx.Node, fx.Node]
    heads: int
    head_dim: int

    @property
    def name(self) -> str:
        return self.proj.name.rpartition(".")[0] or self.proj.name

    @property
    def layers(self) -> tuple[Layer, Layer, Layer, Layer]:
        return self.q, self.k, self.v, self.proj


def find_heads(gm: fx.GraphModule, layers: list[Layer]) -> list[Heads]:
    by_node = {layer.node: layer for layer in layers}
    found = []
    for proj in layers:
        if proj.kind == "linear":
            match = _match(gm, proj, by_node)
            if match is not None:
                found.append(match)
    return found


def _method(node: Any, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name


def _split(node: Any, by_node: dict[fx.Node, Layer]) -> tuple[Layer, fx.Node, int, int] | None:
    """``linear(x).reshape(b, s, H, D).transpose(1, 2)`` → (linear, reshape, H, D)."""
    if not (_method(node, "transpose") and tuple(node.args[1:]) == (1, 2)):
        return None
    reshape: Any = node.args[0]
    if not (_method(reshape, "reshape") or _method(reshape, "view")) or len(reshape.args) != 5:
        return None
    layer = by_node.get(reshape.args[0])
    heads, dim = reshape.args[3], reshape.args[4]
    if layer is None or layer.kind != "linear" or not (isinstance(heads, int) and isinstance(dim, int)):
        return None
    others = [u for u in layer.node.users if u is not reshape and not _method(u, "size")]
    return (layer, reshape, heads, dim) if not others and len(reshape.users) == 1 else None


def _match(gm: fx.GraphModule, proj: Layer, by_node: dict[fx.Node, Layer]) -> Heads | None:
    merge: Any = proj.node.args[0]
    if not (_method(merge, "reshape") or _method(merge, "view")) or merge.args[-1] != -1:
        return None
    back: Any = merge.args[0]
    if not (_method(back, "transpose") and tuple(back.args[1:]) == (1, 2)):
        return None
    mixed: Any = back.args[0]
    if not (isinstance(mixed, fx.Node) and mixed.target is torch.ops.aten.matmul.default):
        return None
    probs: Any = mixed.args[0]
    while isinstance(probs, fx.Node) and (probs.target in _SCALES or probs.target in _SOFTMAX):
        probs = probs.args[0]
    if not (isinstance(probs, fx.Node) and probs.target is torch.ops.aten.matmul.default):
        return None
    q_side: Any = probs.args[0]
    k_side: Any = probs.args[1]
    if not (_method(k_side, "transpose") and tuple(k_side.args[1:]) in ((-2, -1), (-1, -2), (2, 3))):
        return None
    parts = [_split(q_side, by_node), _split(k_side.args[0], by_node), _split(mixed.args[1], by_node)]
    if any(p is None for p in parts):
        return None
    (q, rq, heads, dim), (k, rk, hk, dk), (v, rv, hv, dv) = parts  # type: ignore[misc]
    if (heads, dim) != (hk, dk) or (heads, dim) != (hv, dv) or len({q, k, v}) != 3:
        return None
    return Heads(q, k, v, proj, (rq, rk, rv), heads, dim)


def head_importance(gm: fx.GraphModule, group: Heads) -> torch.Tensor:
    score = torch.zeros(group.heads, dtype=torch.float64)
    for layer in (group.q, group.k, group.v):
        weight = G.get_attr_value(gm, str(layer.weight.target)).detach().double()  # type: ignore[union-attr]
        score += weight.abs().reshape(group.heads, -1).sum(1)
    return score


def kept_heads(heads: int, ratio: float) -> int:
    return max(1, min(heads, math.ceil(heads * (1.0 - ratio))))


def prune_heads(gm: fx.GraphModule, group: Heads, keep: torch.Tensor) -> None:
    """Keep the heads in ``keep`` (sorted indices)."""
    rows = (keep[:, None] * group.head_dim + torch.arange(group.head_dim)).flatten()
    for layer in (group.q, group.k, group.v):
        slice_args(gm, layer, {1: (0, rows), 2: (0, rows)})
    slice_args(gm, group.proj, {1: (1, rows)})
    for reshape in group.reshapes:
        reshape.update_arg(3, int(keep.numel()))
