"""GPTQ: weight-only integers chosen with the layer's inputs (Frantar et al., 2022).

Round-to-nearest quantizes each weight alone. GPTQ quantizes a Linear's weight [out, in] one input
column at a time and spreads each column's rounding error over the columns not yet quantized, in
proportion to the inverse Hessian of the layer's squared output error, ``H = 2 X^T X`` over the
calibration inputs X [tokens, in]: the output error, not the weight error, is what it minimises. As
in the paper: ``damp`` x mean(diag H) added to the diagonal, columns whose input is always zero
dropped, the inverse Hessian's upper Cholesky factor, and updates applied lazily in batches of
columns. Each block's grid is :func:`~torchkiln.compiler.quant_ops.block_grid`'s (symmetric or
asymmetric, one per ``block_size`` inputs) computed on the block's weights as updated when GPTQ
reaches the block — or, with ``act_order``, on the float weights before any column moves — so the
artifact format and kernels (MatMulNBits, Inductor's) are unchanged: only the integers differ.

The Hessians come from one float pass over the calibration batches (every layer's inputs as the
float model computes them: the "parallel" variant, not layer after quantized layer). A layer seen on
fewer input rows (tokens) than it has inputs has a singular Hessian: GPTQ would fit the few
directions the data spans and raise the error everywhere else, so such a layer stays round to nearest.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx

from torchkiln.compiler import graph as G
from torchkiln.compiler.quant_ops import block_grid, pack_codes
from torchkiln.passes.quantize.scaling import run_share


class _Hessians(fx.Interpreter):
    """Runs the graph and sums ``X^T X`` of each chosen linear node's input over every batch."""

    def __init__(self, gm: fx.GraphModule, nodes: Sequence[fx.Node]):
        super().__init__(gm)
        self.wanted = {node.name for node in nodes}
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.wanted:
            x = self.env[n.args[0]]  # type: ignore[index]
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                flat = x.detach().reshape(-1, x.shape[-1]).double()
                self.sums[n.name] = self.sums.get(n.name, 0) + flat.T @ flat  # type: ignore[operator]
                self.rows[n.name] = self.rows.get(n.name, 0) + flat.shape[0]
        return super().run_node(n)


def hessians(
    gm: fx.GraphModule, nodes: Sequence[fx.Node], batches: Iterable[tuple[torch.Tensor, ...]],
    rank: int = 0, world: int = 1,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:  # fmt: skip
    """Each node's ``X^T X / rows`` (float64) over the batches, and its rows; a node never reached
    is absent. With ``world`` > 1 (a torchrun group) rank r runs batches r, r + world, … and the
    sums are added over the ranks (every rank gets them all)."""
    recorder = _Hessians(gm, nodes)
    run_share(recorder, batches, rank, world)
    if world > 1:
        _sum_over_ranks(gm, recorder, nodes)
    return {name: total / recorder.rows[name] for name, total in recorder.sums.items()}, dict(recorder.rows)


def _sum_over_ranks(gm: fx.GraphModule, recorder: _Hessians, nodes: Sequence[fx.Node]) -> None:
    """Every rank's sums and row counts added, node by node in graph order (the same on every rank)."""
    import torch.distributed as dist

    rows = torch.tensor([recorder.rows.get(node.name, 0) for node in nodes], dtype=torch.float64)
    dist.all_reduce(rows)
    for node, count in zip(nodes, rows.tolist()):
        if count == 0:
            continue
        mine = recorder.sums.get(node.name)
        if mine is None:  # this rank's batches never reached the layer: its inputs are the weight's columns
            width = G.get_attr_value(gm, str(node.args[1].target)).shape[1]  # type: ignore[union-attr]
            mine = torch.zeros(width, width, dtype=torch.float64)
        dist.all_reduce(mine)
        recorder.sums[node.name], recorder.rows[node.name] = mine, int(count)


def quantize(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, block_size: int, damp: float,
    symmetric: bool = True, act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """``weight`` [N, K] with the inputs' ``hessian`` [K, K] → :func:`pack_codes`' (packed, scales,
    zero points or None). ``act_order``: columns in order of decreasing Hessian diagonal (the inputs
    with the most energy first, while the most columns are left to absorb their error), each block's
    grid fixed beforehand from the float weights (so a block keeps one scale however its columns
    are visited: the file format does not change)."""
    w = weight.detach().double().clone()
    n, k = w.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    blocks = -(-k // block_size)
    _, _, low, high = block_grid(torch.zeros(1, 1), bits, symmetric)
    scales = torch.ones(n, blocks, dtype=torch.float64)
    zeros = torch.zeros(n, blocks, dtype=torch.float64)
    order = torch.arange(k)
    if act_order:
        padded = torch.nn.functional.pad(w, (0, blocks * block_size - k)).view(n, blocks, block_size)
        scales, zeros, _, _ = block_grid(padded, bits, symmetric)
        order = torch.argsort(torch.diag(h), descending=True, stable=True)
        w, h = w[:, order], h[order][:, order]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    try:
        inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:  # not positive definite even damped: a larger damping, once
        h += 10 * damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
        inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(n, k, dtype=torch.int16)
    step = block_size * max(1, 128 // block_size)  # lazy batches hold whole scale blocks
    for start in range(0, k, step):
        end = min(start + step, k)
        part, errors = w[:, start:end].clone(), torch.zeros(n, end - start, dtype=w.dtype)
        local = inverse[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            block = column // block_size
            if not act_order and column % block_size == 0:  # the block's grid from its weights as updated so far
                scales[:, block], zeros[:, block], _, _ = block_grid(part[:, i : i + block_size], bits, symmetric)
            scale, zero = scales[:, block], zeros[:, block]
            values = torch.clamp(torch.round(part[:, i] / scale) + zero, low, high)
            codes[:, column] = values.to(torch.int16)
            error = (part[:, i] - (values - zero) * scale) / local[i, i]
            part[:, i:] -= error[:, None] * local[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return pack_codes(codes, scales.float(), bits, block_size, None if symmetric else zeros)
