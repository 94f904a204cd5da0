"""Quantized ops of the IR, with their eager (reference) kernels.

Quantization lives in the graph as ops whose eager kernels define the arithmetic, so the numeric
check of every pass and the ``torch`` backend run exactly what the artifact means. Backends lower
them: the ONNX backend maps each to ONNX / ONNX Runtime operators (``backends/onnx_lowering.py``).

* Static int8 uses PyTorch's own decomposed ops, which ``torch.onnx`` already lowers to
  QuantizeLinear / DequantizeLinear: ``quantize_per_tensor`` + ``dequantize_per_tensor`` on
  activations (constant scale and zero point) and ``dequantize_per_channel`` on int8 weight
  buffers, so the exported file holds int8 initializers.
* ``torchkiln::dynamic_linear(x, w_int8, w_scale, bias)``: ``x`` quantized to uint8 per call with
  ONNX's DynamicQuantizeLinear rule (range ``[min(x, 0), max(x, 0)]``, ``scale = range / 255``,
  zero point rounded half to even), times a per-output-channel int8 weight.
* ``torchkiln::weight_only_linear(x, packed, scales, bias, bits, block_size)``: weights quantized
  symmetrically in blocks of ``block_size`` along the input dim, stored as ONNX Runtime's
  MatMulNBits layout: unsigned ``q + 2**(bits-1)``, two 4-bit values per byte (low nibble first).
* ``torchkiln::grouped_weight_only_mm(x, packed, scales, offsets, bits, block_size)``: a mixture of
  experts' grouped matmul (rows of ``x`` sorted by expert, ``offsets`` the running row count per
  expert) whose every expert's [out, in] weight is stored as ``weight_only_linear``'s blocks.
* ``torchkiln::grouped_dynamic_mm(x, weight, scale, offsets)``: the same with every expert's
  weight int8 per output channel (``weight`` [E, out, in], ``scale`` [E, out]) and each expert's
  rows quantized per call as ``dynamic_linear`` quantizes its input.
"""

from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers torch.ops.quantized_decomposed

decomposed = torch.ops.quantized_decomposed
QUANTIZE = decomposed.quantize_per_tensor.default
DEQUANTIZE = decomposed.dequantize_per_tensor.default
DEQUANTIZE_CHANNEL = decomposed.dequantize_per_channel.default


def _no_bias(bias: torch.Tensor, out_features: int) -> torch.Tensor | None:
    # Custom ops take no Optional tensors in the ONNX translation; an empty bias means "none".
    return bias if bias.numel() == out_features else None


@torch.library.custom_op("torchkiln::dynamic_linear", mutates_args=())
def dynamic_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Linear with a uint8 activation quantized per call and an int8 per-channel weight."""
    low = torch.clamp(x.min(), max=0.0)
    high = torch.clamp(x.max(), min=0.0)
    step = (high - low) / 255.0
    step = torch.where(step > 0, step, torch.ones_like(step))
    zero = torch.clamp(torch.round(-low / step), 0, 255)
    xq = (torch.clamp(torch.round(x / step) + zero, 0, 255) - zero) * step
    w = weight.to(x.dtype) * scale.to(x.dtype)[:, None]
    return torch.nn.functional.linear(xq, w, _no_bias(bias, weight.shape[0]))


@dynamic_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("torchkiln::weight_only_linear", mutates_args=())
def weight_only_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor, bits: int, block_size: int
) -> torch.Tensor:
    """Linear whose weight is stored as ``bits``-bit blocks (see :func:`pack_blocks`)."""
    weight = unpack_blocks(packed, scales, bits, block_size, x.shape[-1]).to(x.dtype)
    return torch.nn.functional.linear(x, weight, _no_bias(bias, packed.shape[0]))


@weight_only_linear.register_fake
def _(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor, bits: int, block_size: int
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("torchkiln::grouped_weight_only_mm", mutates_args=())
def grouped_weight_only_mm(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bits: int, block_size: int
) -> torch.Tensor:
    """Each expert's rows of ``x`` times its blocks (``packed`` [E, out, blocks, bytes], ``scales``
    [E, out * blocks]); expert e owns rows ``offsets[e-1]:offsets[e]``."""
    result = x.new_zeros(x.shape[0], packed.shape[1])
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            weight = unpack_blocks(packed[expert], scales[expert], bits, block_size, x.shape[-1]).to(x.dtype)
            result[start:end] = torch.nn.functional.linear(x[start:end], weight)
        start = end
    return result


@torch.library.custom_op("torchkiln::grouped_dynamic_mm", mutates_args=())
def grouped_dynamic_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each expert's rows of ``x`` through ``dynamic_linear`` with its int8 weight."""
    result = x.new_zeros(x.shape[0], weight.shape[1])
    start, none = 0, torch.zeros(0)
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            result[start:end] = dynamic_linear(x[start:end], weight[expert], scale[expert], none)
        start = end
    return result


@grouped_dynamic_mm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[1]))


@grouped_weight_only_mm.register_fake
def _(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bits: int, block_size: int
) -> torch.Tensor:
    return x.new_empty((x.shape[0], packed.shape[1]))


def pack_blocks(weight: torch.Tensor, bits: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [N, K] → (packed uint8 [N, blocks, block_size * bits / 8], scales [N * blocks]).

    Each block of ``block_size`` input weights gets ``scale = max |w| / (2**(bits-1) - 1)`` and
    ``q = clamp(round(w / scale), -2**(bits-1), 2**(bits-1) - 1)``; K is zero-padded to whole blocks.
    """
    n, k = weight.shape
    blocks = -(-k // block_size)
    w = torch.nn.functional.pad(weight.detach().float(), (0, blocks * block_size - k)).view(n, blocks, block_size)
    top = 2 ** (bits - 1) - 1
    scale = w.abs().amax(-1) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / scale[..., None]), -top - 1, top).to(torch.int16)
    return pack_integers(q.view(n, -1)[:, :k], scale, bits, block_size)


def pack_integers(
    q: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed integers ``q`` [N, K] in ``bits`` bits with ``scales`` [N, blocks] → pack_blocks' format
    (how the integers were chosen is the caller's: round to nearest, GPTQ)."""
    n, k = q.shape
    blocks = -(-k // block_size)
    if scales.shape != (n, blocks):
        raise ValueError(f"scales {list(scales.shape)} do not fit [{n}, {blocks}] blocks of {block_size}")
    top = 2 ** (bits - 1) - 1
    if bool((q < -top - 1).any() or (q > top).any()):
        raise ValueError(f"integers outside {bits} bits")
    padded = torch.nn.functional.pad(q.to(torch.int16), (0, blocks * block_size - k)).view(n, blocks, block_size)
    stored = (padded + 2 ** (bits - 1)).to(torch.uint8)
    if bits == 4:
        stored = stored[..., 0::2] | (stored[..., 1::2] << 4)
    return stored.contiguous(), scales.float().reshape(-1).contiguous()


def unpack_blocks(
    packed: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int, in_features: int
) -> torch.Tensor:
    n, blocks, _ = packed.shape
    if bits == 4:
        q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(n, blocks, block_size)
    else:
        q = packed
    values = (q.to(torch.int16) - 2 ** (bits - 1)).float() * scales.view(n, blocks, 1)
    return values.reshape(n, blocks * block_size)[:, :in_features]


def quantize_weight_per_channel(weight: torch.Tensor, levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel (dim 0) int8: ``scale_c = max |w_c| / levels``; returns
    (int8 weight, float scales). ``levels=63`` is the 7-bit "reduce range" variant."""
    w = weight.detach().float()
    scale = w.abs().reshape(w.shape[0], -1).amax(1) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.clamp(torch.round(w / scale.view(shape)), -levels, levels).to(torch.int8)
    return q, scale
