"""GPTQ: weight-only integers chosen with the layer's inputs (Frantar et al., 2022).

Round-to-nearest quantizes each weight alone. GPTQ quantizes a Linear's weight [out, in] one input
column at a time and spreads each column's rounding error over the columns not yet quantized, in
proportion to the inverse Hessian of the layer's squared output error, ``H = 2 X^T X`` over the
calibration inputs X [tokens, in]: the output error, not the weight error, is what it minimises. As
in the paper: ``damp`` x mean(diag H) added to the diagonal, columns whose input is always zero
dropped, the inverse Hessian's upper Cholesky factor, and updates applied lazily in batches of
columns. Scales are those of :func:`~torchkiln.compiler.quant_ops.pack_blocks` (symmetric, one per
``block_size`` inputs) computed on the block's weights as updated when GPTQ reaches the block, so the
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

from torchkiln.compiler.quant_ops import pack_integers


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
    gm: fx.GraphModule, nodes: Sequence[fx.Node], batches: Iterable[tuple[torch.Tensor, ...]]
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Each node's ``X^T X / rows`` (float64) over the batches, and its rows; a node never reached
    is absent."""
    recorder = _Hessians(gm, nodes)
    with torch.no_grad():
        for batch in batches:
            recorder.run(*batch)
    return {name: total / recorder.rows[name] for name, total in recorder.sums.items()}, dict(recorder.rows)


def quantize(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, block_size: int, damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [N, K] with the inputs' ``hessian`` [K, K] → (packed, scales) in pack_blocks' format."""
    w = weight.detach().double().clone()
    n, k = w.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    try:
        inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:  # not positive definite even damped: a larger damping, once
        h += 10 * damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
        inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    top = 2 ** (bits - 1) - 1
    blocks = -(-k // block_size)
    q = torch.zeros(n, k, dtype=torch.int16)
    scales = torch.ones(n, blocks, dtype=torch.float64)
    step = block_size * max(1, 128 // block_size)  # lazy batches hold whole scale blocks
    for start in range(0, k, step):
        end = min(start + step, k)
        part, errors = w[:, start:end].clone(), torch.zeros(n, end - start, dtype=w.dtype)
        local = inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % block_size == 0:
                group = part[:, i : i + block_size].abs().amax(1) / top
                scales[:, column // block_size] = torch.where(group > 0, group, torch.ones_like(group))
            scale = scales[:, column // block_size]
            values = torch.clamp(torch.round(part[:, i] / scale), -top - 1, top)
            q[:, column] = values.to(torch.int16)
            error = (part[:, i] - values * scale) / local[i, i]
            part[:, i:] -= error[:, None] * local[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return pack_integers(q, scales.float(), bits, block_size)
